"""Parameter-efficient fine-tuning over any lowbit base (float, or any quantized format).

``apply_adapter(model, LoraConfig(r=16, target_modules="all-linear"))`` wraps the targeted linear
layers (nn.Linear, Conv1D, QuantLinear of any spec) in one adapter mechanism; ``save_adapter`` /
``load_adapter`` read and write Hugging Face peft's files; ``merge`` folds adapters back into float
weights or into the base's own quantized format.
"""

from __future__ import annotations

from lowbit.peft.base import AdapterLayer, LayerAdapter
from lowbit.peft.config import AdapterConfig
from lowbit.peft.adalora import AdaLoraConfig, adalora_callbacks
from lowbit.peft.bottleneck import BottleneckConfig
from lowbit.peft.ia3 import IA3Config
from lowbit.peft.lora import LoraConfig
from lowbit.peft.model import (active_adapters, adapter_config, adapter_names, apply_adapter, count_parameters,
                               delete_adapter, disable_adapters, per_sample_adapters, set_adapter,
                               trainable_parameters)
from lowbit.peft.peft_format import adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterLayer", "BottleneckConfig", "IA3Config", "adalora_callbacks", "LayerAdapter", "LoraConfig", "active_adapters", "adapter_config",
    "adapter_names", "adapter_state_dict", "apply_adapter", "count_parameters", "delete_adapter",
    "disable_adapters", "load_adapter", "per_sample_adapters", "read_adapter_config", "save_adapter",
    "set_adapter", "trainable_parameters",
]
