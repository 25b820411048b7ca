"""Merge adapters back into the base: into float weights, or into the base's own quantized format.

Merging into a quantized base re-quantizes ``W' = deq(Q) + ΔW`` with the layer's own spec. Without
data each layer takes the better (in ‖deq − W'‖) of a fresh RTN (HQQ for HQQ models) quantization and
rounding onto the base's own grid; both lose most of an update smaller than half a quantization step.
With calibration data (token ids, or the training data) the codes are chosen on the base's grid by
GPTQ's error-compensated rounding under each layer's input Hessian (``gptq_on_grid``), which keeps
the layer's *output* close to the exact merge: that is what the model-level loss sees. The report gives, per layer, how far the stored
result is from the exact float merge (``weight_rel_error``) and how much of the adapter's update
survived (``delta_rel_error`` = ‖stored − deq(Q) − ΔW‖ / ‖ΔW‖). Unmerging restores the base exactly.

A pruned float base keeps its zeros (``keep_sparsity``, the default): where at least ``SPARSE_MIN_ZEROS`` of a base
weight's entries are exactly zero (a pruning pattern — trained dense weights have none), the adapter's update is
masked there, so merging LoRA into a 50 %-sparse model leaves it 50 % sparse (the part of ΔW that fell on pruned
weights is lost and counted in ``delta_rel_error``; ``masked_layers`` says where).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft.base import AdapterLayer, adapter_layers, set_base_weight, unwrap_layer
from lowbit.peft.model import ModulesToSave, peft_state

MERGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPARSE_MIN_ZEROS = 0.1  # a base weight with at least this fraction of exact zeros is treated as pruned


@dataclass
class LayerMergeError:
    weight_rel_error: float  # ‖stored − exact merge‖ / ‖exact merge‖
    delta_rel_error: float   # ‖(stored − old base) − ΔW‖ / ‖ΔW‖ (0: the whole update survived)


@dataclass
class MergeReport:
    adapters: list[str]
    layers: dict[str, LayerMergeError] = field(default_factory=dict)
    requantized: bool = False
    method: str = "float"
    masked_layers: dict[str, float] = field(default_factory=dict)  # layer → its fraction of zeros, kept by the mask

    @property
    def mean_weight_rel_error(self) -> float:
        return _mean(e.weight_rel_error for e in self.layers.values())

    @property
    def mean_delta_rel_error(self) -> float:
        return _mean(e.delta_rel_error for e in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "requantized": self.requantized, "merge_method": self.method,
                "layers_merged": len(self.layers), "mean_weight_rel_error": round(self.mean_weight_rel_error, 6),
                "mean_delta_rel_error": round(self.mean_delta_rel_error, 6),
                "worst_layer": max(self.layers, key=lambda n: self.layers[n].delta_rel_error, default=None),
                "sparsity_kept_layers": len(self.masked_layers),
                "sparsity_kept": round(_mean(self.masked_layers.values()), 6) if self.masked_layers else None}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@torch.no_grad()
def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, *, requantize: bool = True,
          method: str | None = None, merge_dtype: str | torch.dtype | None = None, calibration: Any = None,
          tokenizer: Any = None, show_progress: bool = False, keep_sparsity: bool = True) -> MergeReport:
    """Fold the (active, by default) layer adapters into their base layers, in place.

    A quantized base is re-quantized with its own spec (``requantize``, the default): with
    ``calibration`` (a CalibConfig, token ids [n, L], or {"input_ids", "attention_mask"}) by GPTQ on
    the base's grid, else by rounding (``method`` "hqq" uses HQQ for fresh quantization). The report
    says which. ``merge_dtype`` keeps a float result instead. Float bases stay float.
    ``keep_sparsity``: a base with a pruning pattern (≥ SPARSE_MIN_ZEROS exact zeros) keeps its zeros.
    """
    state = peft_state(model)
    names = list(adapter_names) if adapter_names is not None else list(state.active)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise InvalidSpecError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    for name in names:
        if state.configs[name].is_prompt_learning:
            raise LowbitError(f"adapter {name!r} ({state.configs[name].peft_type}) adds virtual tokens; it has no "
                              "weights to merge")
    dtype = MERGE_DTYPES[merge_dtype] if isinstance(merge_dtype, str) else merge_dtype
    if isinstance(merge_dtype, str) and merge_dtype not in MERGE_DTYPES:
        raise InvalidSpecError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {merge_dtype!r}")
    method = method or getattr(model, "lowbit_method", None) or "rtn"
    layers = {n: layer for n, layer in adapter_layers(model).items() if any(a in layer.adapters for a in names)}
    quantized = any(layer.is_quantized for layer in layers.values()) and requantize and dtype is None
    calibrated = quantized and calibration is not None
    report = MergeReport(names, requantized=quantized,
                         method=("gptq-grid" if calibrated else ("hqq" if method == "hqq" else "rtn")) if quantized
                         else "float")
    pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    from lowbit.progress import progress

    for module_name in progress(list(layers), desc="merge", enabled=show_progress, unit="layer"):
        layer = layers[module_name]
        mine = [a for a in names if a in layer.adapters and a not in layer.merged_adapters]
        if not mine:
            continue
        old = layer.base_weight()
        if not layer.is_quantized:  # float_weight may alias the parameter set_base_weight overwrites below
            old = old.clone()
        exact, bias = layer.merged_weight(mine)
        # only a float base: a quantized one's dequantized zeros are grid points (2-bit grids have many), not pruning
        weight, mask = exact, sparsity_mask(old) if keep_sparsity and not layer.is_quantized else None
        if mask is not None:  # the update does not revive pruned weights
            weight = exact.masked_fill(mask.to(exact.device), 0.0)
            report.masked_layers[module_name] = mask.float().mean().item()
        layer.stash_base()
        if calibrated and layer.is_quantized:
            pending[module_name] = (old, weight, bias)
            set_base_weight(layer, weight, bias, dtype=torch.float32)  # float for now; GPTQ/AWQ below
        else:
            quantizer = _quantizer(report.method, layer) if layer.is_quantized and quantized else None
            set_base_weight(layer, weight, bias, quantizer, dtype=dtype)
            report.layers[module_name] = _error(layer, old, exact)
        layer.merged_adapters.extend(mine)
    if pending:
        _requantize_calibrated(model, layers, pending, method, calibration, tokenizer, show_progress)
        for module_name, (old, weight, _) in pending.items():
            report.layers[module_name] = _error(layers[module_name], old, weight)
    return report


def sparsity_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """True where a pruned weight [out, in] is exactly zero; None unless ≥ SPARSE_MIN_ZEROS of it is."""
    zeros = weight == 0
    return zeros if zeros.float().mean().item() >= SPARSE_MIN_ZEROS else None


def _quantizer(method: str, layer: AdapterLayer, old: Any = None) -> Any:
    """Re-quantizer for one merged layer: the better (smaller ‖deq − W'‖) of a fresh round-to-nearest
    (or HQQ) quantization and rounding onto the base's own grid (its scales and zero-points kept)."""
    from lowbit.algorithms.weight_only import weight_quantizer
    from lowbit.formats.codecs import encode_on_grid
    from lowbit.formats.spec import QuantSpec
    from lowbit.recipe import QuantRecipe
    from lowbit.tensor import QuantizedWeight

    old = old if old is not None else layer.base_layer.weight  # the base's QuantizedWeight before merging
    fresh = weight_quantizer(QuantRecipe(QuantSpec.int_(4), "rtn"))
    if method == "hqq":
        hqq = weight_quantizer(QuantRecipe(QuantSpec.int_(4, symmetric=False), "hqq"))
        rtn = fresh
        fresh = lambda w, spec, name: (hqq(w, spec, name) if spec.format == "int" and not spec.symmetric  # noqa: E731
                                       and spec.granularity != "tensor" else rtn(w, spec, name))

    def quantize(weight: torch.Tensor, spec: Any, name: str) -> Any:
        candidates = [fresh(weight, spec, name)]
        if spec.format in ("int", "nf4", "fp4") and spec == old.spec:
            tensors = {k: v.to(weight.device) for k, v in old.tensors.items()}
            candidates.append(QuantizedWeight(spec, old.shape, encode_on_grid(weight, tensors, spec, name)))
        return min(candidates, key=lambda qw: float((qw.dequantize().to(weight.device) - weight).norm()))
    return quantize


def _error(layer: AdapterLayer, old: torch.Tensor, exact: torch.Tensor) -> LayerMergeError:
    stored = layer.base_weight().to(exact.device)
    delta = exact - old.to(exact.device)
    with torch.no_grad():
        w_err = (stored - exact).norm() / exact.norm().clamp_min(1e-12)
        d_err = (stored - old.to(exact.device) - delta).norm() / delta.norm().clamp_min(1e-12)
    return LayerMergeError(float(w_err), float(d_err))


def _requantize_calibrated(model: nn.Module, layers: dict[str, AdapterLayer], pending: dict[str, Any], method: str,
                           calibration: Any, tokenizer: Any, show_progress: bool) -> None:
    """Re-quantize the merged float layers on calibration data, block by block (the shared runner):
    each layer's codes are chosen on its original grid by GPTQ's error-compensated rounding."""
    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
    from lowbit.algorithms.calibrate import run_layer_by_layer
    from lowbit.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_on_grid
    from lowbit.models.targets import float_weight, linear_dims
    from lowbit.nn.quant_linear import QuantLinear
    from lowbit.quantize import load_tokenizer

    if isinstance(calibration, CalibConfig):
        ids = calibration_batches(tokenizer or load_tokenizer(model), calibration)
        calibration = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif isinstance(calibration, torch.Tensor):  # token ids [samples, seq_len]
        calibration = {"input_ids": calibration, "attention_mask": torch.ones_like(calibration)}
    n = calibration["input_ids"].shape[0]
    batches = [{k: calibration[k][i : i + 8] for k in ("input_ids", "attention_mask")} for i in range(0, n, 8)]
    grids = {f"{n}.base_layer": layers[n]._stash["module"].weight for n in pending}  # type: ignore[index]

    def replace(job: Any) -> QuantLinear:
        qw = gptq_on_grid(float_weight(job.module), job.stats.hessian, grids[job.name], GPTQConfig(), job.name)
        return QuantLinear.from_weight(qw, job.module.bias)

    done = run_layer_by_layer(model, batches, targets=grids, replace=replace, show_progress=show_progress,
                              make_stats=lambda name, module: HessianAccumulator(linear_dims(module)[0]))
    for target in set(grids) - set(done):  # outside the transformer blocks: onto the grid by rounding
        layer = layers[target[: -len(".base_layer")]]
        weight, bias = pending[layer.layer_name][1:]
        set_base_weight(layer, weight, bias, _quantizer("rtn", layer, grids[target]))


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: every merged layer gets its exact original base back."""
    for layer in adapter_layers(model).values():
        if layer.merged_adapters:
            layer.restore_base()


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None, **kwargs: Any
                     ) -> tuple[nn.Module, MergeReport]:
    """Merge, then remove every adapter wrapper: a plain (float or lowbit-quantized) model remains.
    ``modules_to_save`` copies of the merged adapter replace their originals."""
    state = peft_state(model)
    names = list(adapter_names) if adapter_names is not None else list(state.active)
    report = merge(model, names, **kwargs)
    for module_name in list(adapter_layers(model)):
        layer = model.get_submodule(module_name)
        layer._stash = None
        unwrap_layer(model, module_name)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            keep = next((module.copies[n] for n in names if n in module.copies), module.original_module)
            keep.requires_grad_(False)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, keep)
    model.lowbit_peft = type(state)()  # type: ignore[attr-defined]
    return model, report
