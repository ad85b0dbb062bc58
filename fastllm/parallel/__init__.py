"""fastllm's parallel engine on torch.distributed: one rank grid, parallelism applied as functions to models.

Invariants (shared by every file of this package):
- `Mesh` (mesh.py) is built once per run from (dp, pp, tp); every process group comes from it and is passed
  explicitly. A size-1 dimension has group None and its collectives are no-ops, so the same code runs in one
  process without torch.distributed initialized.
- Parameter names stay those of the single-device model (canonical names) in every layout; a tensor-parallel
  shard records how it maps into the canonical tensor (`tp_dim`, `tp_index` attributes, see tensor_parallel.py),
  a pipeline stage keeps only its layers under their original names, and a weight tied across pipeline stages
  has one owner (the first stage) and copies flagged `tied_copy` (excluded from norms and checkpoints).
  Under sequence parallelism, replicated params that see only their rank's positions are flagged
  `sequence_parallel`; their partial gradients are summed over tp before clipping (engine.py).
- Losses are weighted by each micro-batch's share of the *global* batch and gradients are SUMMED across data-
  parallel ranks, so every layout computes the single-process gradient of the same global batch.
"""
