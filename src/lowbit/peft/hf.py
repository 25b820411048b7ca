"""Hugging Face peft on a lowbit-quantized model: QuantLinear registered with peft's custom modules.

``peft.get_peft_model(model, register_quant_linear(LoraConfig(...)))`` then trains LoRA over
lowbit's QuantLinear layers with peft's own code; its saved adapter loads back into lowbit
(:func:`lowbit.peft.load_adapter`) and vice versa. peft is imported only here, lazily.
"""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError
from lowbit.nn.quant_linear import QuantLinear


def quant_linear_lora_class() -> type:
    """peft's LoRA ``Linear`` taught QuantLinear's sizes and device (its weight is packed, never cast)."""
    from peft.tuners.lora.layer import Linear

    class QuantLinearLora(Linear):  # type: ignore[misc, valid-type]
        """peft LoRA over a lowbit QuantLinear: ``y = base(x) + s·B A dropout(x)``."""

        def _get_in_out_features(self, module: Any) -> tuple[int, int]:
            if isinstance(module, QuantLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def _get_base_layer_device_and_dtype(self, base_layer: Any) -> tuple[Any, Any]:
            if isinstance(base_layer, QuantLinear):
                return base_layer.qdata.device, None  # packed integer data: adapters keep their own dtype
            return super()._get_base_layer_device_and_dtype(base_layer)

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise LowbitError("merging peft LoRA into a lowbit QuantLinear: save the adapter, load it with "
                              "lowbit.peft.load_adapter and use lowbit.peft.merge (re-quantizes with the base's spec)")

    return QuantLinearLora


def register_quant_linear(config: Any, model: Any = None) -> Any:
    """Register lowbit's QuantLinear with a peft ``LoraConfig`` (peft's custom-module mechanism); returns it.

    peft's ``target_modules="all-linear"`` only looks for ``nn.Linear``; given the ``model``, it is
    expanded here to the names of every linear layer (QuantLinear included) but the output head.
    """
    if model is not None and getattr(config, "target_modules", None) == "all-linear":
        from lowbit.models.build import output_head_name
        from lowbit.models.targets import linear_modules

        head = output_head_name(model)
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model) if n != head})
    config._register_custom_module({QuantLinear: quant_linear_lora_class()})
    return config
