"""Parameter counts and stored bytes of float and quantized models."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lowbit.models.targets import counted_linear_names
from lowbit.nn.quant_linear import QuantLinear


@dataclass
class SizeReport:
    """Sizes of a model as stored.

    ``params`` counts logical weights (a 4-bit weight is one parameter); ``size_bytes`` is every
    stored tensor (tied weights once); ``linear_*`` cover the linear layers except the output head,
    which is what ``bits_per_weight`` reports (scales, zero-points and other metadata included).
    """

    params: int = 0
    size_bytes: int = 0
    linear_params: int = 0
    linear_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.linear_bytes / self.linear_params if self.linear_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_weight": round(self.bits_per_weight, 4)}


def model_size(model: nn.Module) -> SizeReport:
    report = SizeReport()
    counted = set(counted_linear_names(model))
    quant_modules = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in quant_modules.items():
        report.params += module.in_features * module.out_features
        report.size_bytes += module.weight.nbytes
        if name in counted:
            report.linear_params += module.in_features * module.out_features
            report.linear_bytes += module.weight.nbytes
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        module_name, _, attr = name.rpartition(".")
        if module_name in quant_modules and attr in quant_modules[module_name]._tensor_names:
            continue  # counted above as the stored weight (bias, input scales: counted here)
        if id(tensor) in seen:
            continue  # tied weights are stored once
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        report.params += tensor.numel() if tensor.is_floating_point() and isinstance(tensor, nn.Parameter) else 0
        report.size_bytes += nbytes
        if module_name in counted and attr == "weight":
            report.linear_params += tensor.numel()
            report.linear_bytes += nbytes
    return report
