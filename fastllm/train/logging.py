"""Run logging: metrics.jsonl, eval.json, optional TensorBoard, and a loss-curve PNG.

Invariants: only the process that owns the logger (rank 0) writes; each metrics line is one JSON object with at
least step, loss, lr, grad_norm, tokens_per_s, mfu, peak_flops, skipped_steps; TensorBoard and matplotlib are
imported lazily and their absence is never an error.
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True):
        self.out, self.enabled, self.tb = Path(out), enabled, None
        self.path = self.out / "metrics.jsonl"
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def write_eval(self, results: dict) -> Path:
        path = self.out / "eval.json"
        if self.enabled:
            path.write_text(json.dumps(results, indent=1))
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: Path, png: Path) -> Path | None:
    """Saves the loss curve; None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not Path(metrics_path).is_file():
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
