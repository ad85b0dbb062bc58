"""Fused softmax cross-entropy: `cross_entropy(logits, labels, ...)` and
`linear_cross_entropy(hidden, weight, labels, bias=..., ...)` (the LM / MLM head loss without (N, V) logits).

Invariants:
- Semantics are those of torch.nn.functional.cross_entropy with class-index labels (int64, shape (N,)) and
  (N, V) logits, for ignore_index, label_smoothing in [0, 1] and reduction none/mean/sum: ignored rows give 0
  ('none') and are left out of the mean's count; 'mean' with every row ignored is nan with zero gradients.
  The loss is returned in the input dtype; it is computed (and reduced) in fp32 for every input dtype.
- cross_entropy: the kernel returns per-row fp32 losses and the logsumexp; the reduction is plain torch on
  (N,) values, so autograd hands the backward one fp32 scale per row, and the backward is one fused pass.
- linear_cross_entropy: only the non-ignored rows are multiplied, in chunks of `chunk_size` rows (automatic
  when None: see `auto_chunk_size`), so at most chunk x V logits exist. For mean/sum the forward also computes
  the gradients (grad_weight/grad_bias accumulated in fp32) and the backward only scales them by grad_output;
  for 'none' the backward recomputes them chunk by chunk with per-row scales.
- linear_cross_entropy_into (no autograd; the cpu backend, fp32, mean/sum) returns (loss, grad_hidden, grad_bias)
  of the same computation and writes grad_weight into a caller's (V, H) buffer, old values overwritten: for a
  caller that reuses that buffer across steps (fastllm.nn.heads.VocabLoss), since a fresh (V, H) tensor is
  page-faulted in and zero-filled on every call on CPU.
- Backends (fastllm.ops.backends): reference (fastllm.ops.reference), cpu/cuda (torch.ops.fastllm.*, in
  csrc/cross_entropy/), triton (fastllm.kernels.cross_entropy). float64 runs on reference only.
- The dispatcher ops have fake kernels and autograd formulas registered here: they work under
  torch.compile(fullgraph=True) and pass torch.library.opcheck. Double backward is not supported.
- Bad arguments raise errors naming the argument, the same for every backend; label values are checked in
  eager mode here (one device sync on GPU) and again by the C++ kernels.
"""
from __future__ import annotations

import torch

from fastllm import _ext
from fastllm.ops import backends, reference
from fastllm.ops._checks import check_float, check_like

__all__ = ["auto_chunk_size", "cross_entropy", "linear_cross_entropy", "linear_cross_entropy_into"]

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # the at::Reduction values the kernels take

# ---- cross_entropy: fakes and autograd ----


def _ce_fwd_fake(logits, labels, ignore_index, label_smoothing):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)  # (N,)
    return rows, rows.clone()


def _ce_bwd_fake(grad_loss, logits, labels, lse, ignore_index, label_smoothing):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, ctx.ignore_index, ctx.label_smoothing = inputs
    ctx.save_for_backward(logits, labels, output[1])


def _make_ce_backward(bwd_op):
    def backward(ctx, dloss, _dlse):
        logits, labels, lse = ctx.saved_tensors
        if dloss is None:
            return torch.zeros_like(logits), None, None, None
        grad = bwd_op(dloss.float().contiguous(), logits, labels, lse, ctx.ignore_index, ctx.label_smoothing)
        return grad, None, None, None

    return backward


def register_ce(fwd_name: str, bwd_name: str, bwd_op) -> None:
    """Registers fake kernels and the autograd formula for a cross_entropy (fwd, bwd) pair of ops."""
    torch.library.register_fake(fwd_name)(_ce_fwd_fake)
    torch.library.register_fake(bwd_name)(_ce_bwd_fake)
    torch.library.register_autograd(fwd_name, _make_ce_backward(bwd_op), setup_context=_ce_setup_context)


# ---- linear_cross_entropy: fakes and autograd ----


def _lce_fwd_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_size,
                  compute_grad):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    if not (compute_grad and reduction != 0):
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), gb


def _lce_bwd_fake(grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_size):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, smoothing, reduction, chunk, compute_grad = inputs
    ctx.args = (ignore_index, smoothing, chunk)
    ctx.reduction, ctx.has_bias = reduction, bias is not None
    ctx.precomputed = compute_grad and reduction != 0
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no zero-filled (V, H) per call
    if ctx.precomputed:  # the forward's gradients: backward only scales them
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels)


def _row_grads(ctx, dloss, labels):
    """The per-row fp32 scale of d loss_i for the reduction, from the gradient of the reduced loss."""
    dloss = dloss.float()
    if ctx.reduction == 0:
        return dloss.contiguous()  # (N,)
    rows = dloss.expand(labels.shape[0])  # (N,)
    if ctx.reduction == 1:
        rows = rows / (labels != ctx.args[0]).sum()  # ignored rows get zero gradients whatever the scale
    return rows.contiguous()


def _is_one(dloss: torch.Tensor) -> bool:
    """dloss == 1 exactly. Eager only (one tiny read, a sync on GPU): when traced (torch.compile, AOT dispatch,
    fake or functional tensor subclasses) the value is unknown and the gradients are always multiplied."""
    if torch.compiler.is_compiling() or type(dloss) is not torch.Tensor or dloss.numel() != 1:
        return False
    return bool(dloss == 1)


def scale_precomputed(dloss: torch.Tensor, *grads):
    """The gradients a forward precomputed for d loss = 1, times dloss (each in its own dtype, None kept). A plain
    loss.backward() passes exactly 1: then they are returned as they are, skipping a (V, H) multiply and copy."""
    if _is_one(dloss):
        return grads
    dl = dloss.float()
    return tuple(None if g is None else (g * dl).to(g.dtype) for g in grads)


def _make_lce_backward(bwd_op):
    def backward(ctx, dloss, *_):
        if dloss is None:  # the loss itself is unused: every gradient is zero
            return (None,) * 9
        if ctx.precomputed:
            gh, gw, gb = scale_precomputed(dloss, *ctx.saved_tensors)
            return gh, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        gh, gw, gb = bwd_op(_row_grads(ctx, dloss, labels), hidden, weight, bias, labels, *ctx.args)
        return gh, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None

    return backward


def register_lce(fwd_name: str, bwd_name: str, bwd_op) -> None:
    """Registers fake kernels and the autograd formula for a linear_cross_entropy (fwd, bwd) pair of ops."""
    torch.library.register_fake(fwd_name)(_lce_fwd_fake)
    torch.library.register_fake(bwd_name)(_lce_bwd_fake)
    torch.library.register_autograd(fwd_name, _make_lce_backward(bwd_op), setup_context=_lce_setup_context)


def _lce_into_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_size,
                   grad_weight):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), gb


if _ext.load().loaded and hasattr(torch.ops.fastllm, "cross_entropy_fwd"):
    register_ce("fastllm::cross_entropy_fwd", "fastllm::cross_entropy_bwd", torch.ops.fastllm.cross_entropy_bwd)
    register_lce("fastllm::linear_cross_entropy_fwd", "fastllm::linear_cross_entropy_bwd",
                 torch.ops.fastllm.linear_cross_entropy_bwd)
    torch.library.register_fake("fastllm::linear_cross_entropy_fwd_into")(_lce_into_fake)  # no autograd: eager

# ---- argument checks ----


def _check_labels(labels, rows: int, device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class indices, got {labels.dtype}")
    if tuple(labels.shape) != (rows,):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but expected ({rows},)")
    if labels.device != torch.device(device):
        raise ValueError(f"labels is on {labels.device} but the input is on {device}")


def _check_label_values(labels, vocab: int, ignore_index: int) -> None:
    """Eager only (a data-dependent check cannot be traced; the C++ kernels check again)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))  # (N,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is out of range [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def _check_options(label_smoothing, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_ce_args(logits, labels, ignore_index, label_smoothing, reduction) -> None:
    check_float("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, V) with V > 0, got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[0], logits.device)
    _check_options(label_smoothing, reduction)
    _check_label_values(labels, logits.shape[1], ignore_index)


def _check_lce_args(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size):
    check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (N, H), got {tuple(hidden.shape)}")
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {hidden.shape[1]}) with V > 0, got {tuple(weight.shape)}")
    check_like("weight", weight, hidden, (weight.shape[0], hidden.shape[1]))
    check_like("bias", bias, hidden, (weight.shape[0],))
    _check_labels(labels, hidden.shape[0], hidden.device)
    _check_options(label_smoothing, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_label_values(labels, weight.shape[0], ignore_index)


def _backend(op: str, x: torch.Tensor, backend: str) -> str:
    name = backends.select(op, x.device, backend)
    if x.dtype == torch.float64 and backend == "auto":
        return "reference"  # the only backend with float64; the fused kernels take fp32/bf16/fp16
    if name != "reference" and x.dtype == torch.float64:
        raise TypeError(f"{op}: the {name} backend supports float32/bfloat16/float16, not float64")
    return name


# ---- public functions ----


def _reduce(rows: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows  # (N,)
    total = rows.sum()  # ()
    return total if reduction == "sum" else total / (labels != ignore_index).sum()  # 0/0 = nan as torch


def _ce_op(name: str):
    if name == "triton":
        from fastllm.kernels import cross_entropy as kernel  # lazy: triton is optional

        return kernel.cross_entropy_fwd_op()
    return torch.ops.fastllm.cross_entropy_fwd


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(logits (N, V), labels (N,)) with one fused pass forward and one backward."""
    _check_ce_args(logits, labels, ignore_index, label_smoothing, reduction)
    name = _backend("cross_entropy", logits, backend)
    if name == "reference":
        return reference.cross_entropy(logits, labels, ignore_index, label_smoothing, reduction)
    rows, _ = _ce_op(name)(logits.contiguous(), labels.contiguous(), int(ignore_index), float(label_smoothing))
    return _reduce(rows, labels, ignore_index, reduction).to(logits.dtype)


def auto_chunk_size(rows: int, vocab: int, device) -> int:
    """Rows per chunk: a power of two with chunk x V ~ 16 M logits (64 MiB fp32) on CPU, 64 M on GPU
    (bigger GEMMs run closer to peak there), between 16 and 4096, and no more than the rows present.

    Under torch.compile the row count is not a cap: min(chunk, rows) passed to the op would specialize the
    graph on a symbolic row count (a recompile per sequence length). The cap changes nothing else: every
    backend sizes its logits buffer by min(chunk, rows to compute); rows <= chunk is one chunk either way."""
    budget = 1 << (26 if torch.device(device).type == "cuda" else 24)
    chunk = 1 << max(4, min(12, (budget // vocab).bit_length() - 1))
    return chunk if torch.compiler.is_compiling() else max(1, min(chunk, rows))


def _lce_op(name: str):
    if name == "triton":
        from fastllm.kernels import cross_entropy as kernel  # lazy: triton is optional

        return kernel.linear_cross_entropy_fwd_op()
    return torch.ops.fastllm.linear_cross_entropy_fwd


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """cross_entropy(hidden (N, H) @ weight (V, H).T + bias (V,), labels (N,)) without materializing (N, V)
    logits. For an LM/MLM head, flatten (B, T, H) hidden states and (B, T) labels to (B*T, H) and (B*T,)."""
    _check_lce_args(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size)
    name = _backend("linear_cross_entropy", hidden, backend)
    if name == "reference":
        return reference.linear_cross_entropy(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction)
    chunk = chunk_size or auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    cont = (lambda t: None if t is None else t.contiguous())
    loss, *_ = _lce_op(name)(hidden.contiguous(), weight.contiguous(), cont(bias), labels.contiguous(),
                             int(ignore_index), float(label_smoothing), REDUCTIONS[reduction], int(chunk),
                             _wants_grad(hidden, weight, bias))
    return loss.to(hidden.dtype)


def _check_into(hidden, weight, grad_weight, reduction) -> None:
    if hidden.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"linear_cross_entropy_into runs on CPU float32 only, got {weight.dtype} on {hidden.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy_into needs reduction 'mean' or 'sum', got {reduction!r}")
    if not isinstance(grad_weight, torch.Tensor) or grad_weight.dtype != torch.float32 \
            or grad_weight.shape != weight.shape or not grad_weight.is_contiguous():
        got = tuple(grad_weight.shape) if isinstance(grad_weight, torch.Tensor) else type(grad_weight).__name__
        raise ValueError(f"grad_weight must be a contiguous float32 tensor of shape {tuple(weight.shape)}, "
                         f"got {got}")


@torch.no_grad()
def linear_cross_entropy_into(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              grad_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                              ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                              chunk_size: int | None = None):
    """(loss, d loss / d hidden, d loss / d bias or None) of linear_cross_entropy, with d loss / d weight written
    into grad_weight (V, H) (old values overwritten). No autograd: the caller hands the gradients on."""
    _check_lce_args(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size)
    _check_into(hidden, weight, grad_weight, reduction)
    chunk = chunk_size or auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    loss, gh, gb = torch.ops.fastllm.linear_cross_entropy_fwd_into(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.contiguous(),
        int(ignore_index), float(label_smoothing), REDUCTIONS[reduction], int(chunk), grad_weight)
    return loss, gh, (gb if bias is not None else None)
