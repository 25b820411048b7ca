"""Compression beyond post-training quantization: pruning (unstructured, N:M, structured), quantization-aware
training (block-wise, QA-LoRA) and knowledge distillation."""

from lowbit.compress.prune import PruneConfig, PruneResult, prune_model
from lowbit.compress.qat import QATConfig, QATResult, convert_qat, prepare_qat, qat
from lowbit.compress.structured import StructuredConfig, StructuredResult, prune_structured

__all__ = ["PruneConfig", "PruneResult", "prune_model", "QATConfig", "QATResult", "convert_qat", "prepare_qat", "qat",
           "StructuredConfig", "StructuredResult", "prune_structured"]
