"""Parameter-efficient fine-tuning over any lowbit base (float, or any quantized format).

``apply_adapter(model, LoraConfig(r=16, target_modules="all-linear"))`` wraps the targeted linear
layers (nn.Linear, Conv1D, QuantLinear of any spec) in one adapter mechanism; ``save_adapter`` /
``load_adapter`` read and write Hugging Face peft's files; ``merge`` folds adapters back into float
weights or into the base's own quantized format.
"""

from __future__ import annotations

from lowbit.peft.adalora import AdaLoraConfig, adalora_callbacks
from lowbit.peft.base import AdapterLayer, LayerAdapter
from lowbit.peft.bottleneck import BottleneckConfig
from lowbit.peft.config import AdapterConfig
from lowbit.peft.finetune import FinetuneResult, finetune, load_with_adapter
from lowbit.peft.ia3 import IA3Config
from lowbit.peft.lora import LoraConfig
from lowbit.peft.merge import MergeReport, merge, merge_and_unload, unmerge
from lowbit.peft.model import (active_adapters, adapter_config, adapter_names, apply_adapter, count_parameters,
                               delete_adapter, disable_adapters, per_sample_adapters, set_adapter,
                               trainable_parameters)
from lowbit.peft.peft_format import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from lowbit.peft.prefix import PrefixTuningConfig
from lowbit.peft.prompt import PromptTuningConfig

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterLayer", "BottleneckConfig", "FinetuneResult", "IA3Config",
    "LayerAdapter", "LoraConfig", "MergeReport", "PrefixTuningConfig", "PromptTuningConfig", "active_adapters",
    "adalora_callbacks", "adapter_config", "adapter_names", "adapter_state_dict", "apply_adapter", "count_parameters",
    "delete_adapter", "disable_adapters", "finetune", "load_adapter", "load_with_adapter", "merge",
    "merge_and_unload", "per_sample_adapters", "read_adapter_config", "save_adapter", "set_adapter",
    "trainable_parameters", "unmerge",
]
