"""Compression beyond post-training quantization: pruning (unstructured, N:M) — QAT and distillation next."""

from lowbit.compress.prune import PruneConfig, PruneResult, prune_model

__all__ = ["PruneConfig", "PruneResult", "prune_model"]
