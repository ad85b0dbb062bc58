"""fastllm.eval: metrics (numpy only), the nine GLUE tasks and their loaders, NER/QA data for fine-tuning.

Invariant: importing this package imports neither scikit-learn, scipy, seqeval nor datasets (the first three
are test oracles only; datasets is imported lazily by glue.load_hub).
"""
from fastllm.eval import glue, metrics, tasks

__all__ = ["glue", "metrics", "tasks"]
