"""Quantize a checkpoint straight from its safetensors shards, one tensor at a time.

The float model is never materialised: the architecture is built with meta parameters (to learn
which tensors are linear weights and their module types), then each checkpoint tensor is read
(memory-mapped), quantized or passed through, and handed to a shard writer that flushes every
``max_shard_bytes``. Peak memory ≈ one shard of output + the largest tensor + fixed overhead.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import CorruptFileError, OutputExistsError, UnsupportedModelError
from lowbit.eval.size import SizeReport
from lowbit.io.checkpoint import copy_aux_files, map_checkpoint_key, quantized_layers
from lowbit.io.qconfig import make_quantization_config
from lowbit.memory import check_budget
from lowbit.io.safetensors_io import stream_tensors, weight_files
from lowbit.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, atomic_output_dir, write_json
from lowbit.models.build import build_empty_model
from lowbit.models.key_renames import KeyRenamer
from lowbit.models.resolve import read_json, resolve_model_dir
from lowbit.models.targets import (check_target_shapes, counted_linear_names, is_conv1d, select_targets,
                                   tied_target_sources)
from lowbit.nn.quant_linear import QuantLinear
from lowbit.progress import progress
from lowbit.formats.spec import QuantSpec
from lowbit.recipe import LAYERWISE_METHODS, QuantRecipe, as_recipe
from lowbit.algorithms.weight_only import weight_quantizer
from lowbit.tensor import check_finite


@dataclass
class QuantizeResult:
    out: Path
    layers_quantized: int
    size: SizeReport
    seconds: float
    layer_specs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "layers_quantized": self.layers_quantized,
            "bits_per_weight": round(self.size.bits_per_weight, 4),
            "size_bytes": self.size.size_bytes,
            "params": self.size.params,
            "linear_weight_bytes": self.size.linear_bytes,
            "linear_params": self.size.linear_params,
            "seconds": round(self.seconds, 3),
        }


def quantize_pretrained(source: str | Path, spec_or_recipe: QuantSpec | QuantRecipe | dict[str, Any], out: str | Path,
                        *, overwrite: bool = False, show_progress: bool = True,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, calibration: Any = None,
                        device: str = "cpu") -> QuantizeResult:
    """Quantize the model at ``source`` (HF dir, lowbit dir or ``builtin:NAME``) into a lowbit directory ``out``.

    Round-to-nearest streams tensor by tensor from the safetensors shards; calibrated methods
    (GPTQ …) load the model and run it block by block on the calibration data.
    """
    start = time.perf_counter()
    recipe = as_recipe(spec_or_recipe)
    if Path(out).exists() and not overwrite:  # fail before any work, not after it
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    if not recipe.streams:
        return _quantize_loaded(source, recipe, Path(out), overwrite, show_progress, max_shard_bytes, start,
                                calibration=calibration, device=device)
    src = resolve_model_dir(source)
    config_path = src / "config.json"
    config = read_json(config_path)
    if quantized_layers(config, str(config_path))[0]:
        return _quantize_loaded(src, recipe, Path(out), overwrite, show_progress, max_shard_bytes, start)
    model = build_empty_model(config, str(config_path))
    targets = select_targets(model, recipe)
    if not targets:
        raise UnsupportedModelError(f"{src}: the recipe selects no linear layer to quantize (skip={list(recipe.skip)}, "
                                    f"include={recipe.include})")
    check_target_shapes(model, targets)
    quantize_weight = weight_quantizer(recipe)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = KeyRenamer(model)  # transformers' load-time key renames (GPT-NeoX embed_out → lm_head …)
    counted = set(counted_linear_names(model))
    size = SizeReport()
    stored_specs: dict[str, QuantSpec] = {}
    files = weight_files(src)
    done: set[str] = set()
    untied: dict[str, list[str]] = {}  # source parameter → tied target layers quantized from it
    for head, tied_to in tied_target_sources(model, targets).items():
        untied.setdefault(tied_to, []).append(head)
    shared: dict[str, str] = {}  # tied_head: share → {embedding module: head module}; the embedding is not stored
    if recipe.tied_head == "share":
        shared = {tied_to.rpartition(".")[0]: head for head, tied_to in tied_target_sources(model, targets).items()}

    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)

        def quantize_into(module_name: str, tensor: torch.Tensor) -> None:
            weight = tensor.float()
            if is_conv1d(modules[module_name]):
                weight = weight.t()
            qw = quantize_weight(weight, targets[module_name], module_name)
            stored_specs[module_name] = qw.spec  # may differ from the request (HQQ: float zeros)
            for tname, t in qw.tensors.items():
                writer.add(f"{module_name}.{tname}", t)
            _account(size, qw.numel, qw.nbytes, module_name in counted, True)
            done.add(module_name)

        for file in files:
            with stream_tensors(file) as (keys, get_tensor):
                for key in progress(keys, desc=f"quantize {file.name}", enabled=show_progress, unit="tensor"):
                    name = map_checkpoint_key(key, expected, prefix, rename)
                    if name is None:
                        continue
                    module_name, _, attr = name.rpartition(".")
                    check_budget(f"before reading {key}")
                    tensor = get_tensor(key)
                    if module_name in targets and attr == "weight":
                        quantize_into(module_name, tensor)
                    elif module_name in shared and attr == "weight":
                        check_finite(tensor, name)  # read by the shared head below, stored only as the head
                    else:
                        check_finite(tensor, name)
                        writer.add(name, tensor)
                        nbytes = tensor.numel() * tensor.element_size()
                        _account(size, tensor.numel(), nbytes, module_name in counted and attr == "weight",
                                 name in params and tensor.is_floating_point())
                    for head in untied.get(name, ()):  # a tied head quantized from its source (the embedding)
                        quantize_into(head, tensor)
                    del tensor
        missing = sorted(set(targets) - done)
        if missing:
            raise CorruptFileError(f"{src}: checkpoint has no weight for layer(s) {', '.join(missing[:5])}")
        writer.finish()
        if untied:
            config["tie_word_embeddings"] = False  # the head now has its own (quantized) weight
        config.pop("quantization_config", None)
        extra: dict[str, Any] = {"source": str(source), **({"shared_embeddings": shared} if shared else {})}
        config["quantization_config"] = make_quantization_config(stored_specs, recipe.method, extra)
        write_json(tmp / "config.json", config)
        copy_aux_files(src, tmp)
    return QuantizeResult(Path(out), len(stored_specs), size, time.perf_counter() - start, stored_specs)


def _account(size: SizeReport, numel: int, nbytes: int, counted: bool, is_param: bool) -> None:
    size.size_bytes += nbytes
    if is_param:
        size.params += numel
    if counted:
        size.linear_params += numel
        size.linear_bytes += nbytes


def _quantize_loaded(source: str | Path, recipe: QuantRecipe, out: Path, overwrite: bool, show_progress: bool,
                     max_shard_bytes: int, start: float, *, calibration: Any = None, device: str = "cpu") -> QuantizeResult:
    """Load the model, quantize it in memory, save it. Used for calibrated methods and for lowbit
    directories as input (dequantized first: re-quantizing compounds the rounding error)."""
    import warnings

    from lowbit.eval.size import model_size
    from lowbit.io.checkpoint import load, save
    from lowbit.quantize import dequantize_model, quantize

    config = read_json(resolve_model_dir(source) / "config.json")
    already_quantized = bool(quantized_layers(config, str(source))[0])
    # calibrated methods on a float model: blocks are read from disk one at a time
    model = load(source, lazy_blocks=recipe.method in LAYERWISE_METHODS and not already_quantized)
    if already_quantized:
        warnings.warn(f"{source} is already quantized: re-quantizing its dequantized weights compounds the rounding "
                      "error; quantize the float model instead where you have it", stacklevel=3)
        dequantize_model(model)
    # GPTQ/AWQ save each finished block next to OUT: a killed run started again continues after the last one
    resume_dir = out.parent / f".{out.name}.resume" if recipe.method in ("gptq", "awq") else None
    quantize(model, recipe, calibration=calibration, device=device, show_progress=show_progress,
             checkpoint_dir=resume_dir)
    extra = None if already_quantized else {"source": str(source)}
    save(model, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes, extra_config=extra)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    specs = {name: m.spec for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    return QuantizeResult(out, len(specs), model_size(model), time.perf_counter() - start, specs)
