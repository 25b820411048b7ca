"""Calibrated post-training quantization of a whole model: calibration data → layer-by-layer runner → algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
from lowbit.algorithms.calibrate import LayerJob, run_layer_by_layer
from lowbit.algorithms.awq import AWQConfig, InputSampler, linear_weight, search_clip, search_scale
from lowbit.algorithms.gptq import HessianAccumulator, gptq_quantize
from lowbit.algorithms.smoothing import fold_into_norm, foldable_pairs
from lowbit.algorithms.weight_only import method_config
from lowbit.models.targets import check_target_shapes, float_weight, is_conv1d, linear_dims, select_targets, set_submodule
from lowbit.nn.quant_linear import QuantLinear
from lowbit.recipe import QuantRecipe


def quantize_calibrated(model: nn.Module, recipe: QuantRecipe, tokenizer: Any, calib: CalibConfig, *,
                        device: str | torch.device = "cpu", batch_size: int = 8,
                        show_progress: bool = True, checkpoint_dir: str | Path | None = None) -> nn.Module:
    """Quantize ``model`` in place with a data-driven method (``recipe.method``, e.g. GPTQ).

    ``checkpoint_dir``: every finished block is saved there; a run of the same recipe, calibration and model
    finds them and continues after the last one (the result is the same as an uninterrupted run's).
    """
    options = method_config(recipe)
    targets = select_targets(model, recipe)
    check_target_shapes(model, targets)
    ids = calibration_batches(tokenizer, calib)  # [samples, seq_len]
    checkpoint = None
    if checkpoint_dir is not None:
        from lowbit.algorithms.block_checkpoint import BlockCheckpoint, run_fingerprint

        checkpoint = BlockCheckpoint(checkpoint_dir, run_fingerprint(
            recipe.to_dict(), str(options), batch_size, _model_identity(model), ids))
        if checkpoint.finished and show_progress:
            import sys

            print(f"lowbit: resuming {recipe.method} after block {max(checkpoint.finished)} (saved in "
                  f"{checkpoint_dir})", file=sys.stderr)
    batches = [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
               for i in range(0, ids.shape[0], batch_size)]

    if recipe.method == "gptq":
        def make_stats(name: str, module: nn.Module) -> Any:
            return HessianAccumulator(linear_dims(module)[0], device=device)

        def replace(job: LayerJob) -> QuantLinear:
            # the last layer reading a (shared) Hessian hands it over: GPTQ overwrites it in place
            hessian = job.stats.hessian
            if job.last_user:
                job.stats.hessian = None
            qw = gptq_quantize(float_weight(job.module), hessian, targets[job.name], options, job.name,
                               consume_hessian=job.last_user)
            return QuantLinear.from_weight(qw, job.module.bias)

        prepare_block = None
        sequential = options.true_sequential
    else:  # awq
        sequential = False
        def make_stats(name: str, module: nn.Module) -> Any:
            return InputSampler(linear_dims(module)[0], options.max_rows)

        def prepare_block(block: nn.Module, prefix: str, jobs: dict[str, LayerJob], run: Any) -> None:
            _awq_block(block, prefix, jobs, run, targets, options)

        def replace(job: LayerJob) -> QuantLinear:
            return QuantLinear.from_float(job.module, targets[job.name], job.name)

    _require_memory(model, targets, calib, batch_size, recipe)
    done = run_layer_by_layer(model, batches, targets=targets, make_stats=make_stats, replace=replace,
                              device=device, prepare_block=prepare_block, sequential=sequential,
                              share_stats=recipe.method == "gptq", show_progress=show_progress,
                              checkpoint=checkpoint)
    for name in set(targets) - set(done):  # layers outside the block list (a BERT pooler, an output head)
        module = model.get_submodule(name)
        if recipe.method == "gptq":  # no captured inputs: GPTQ with H = I, i.e. RTN on GPTQ's MSE-clipped grid
            weight = float_weight(module)
            eye = torch.eye(weight.shape[1], device=weight.device)
            qlinear = QuantLinear.from_weight(gptq_quantize(weight.float(), eye, targets[name], options, name),
                                              module.bias)
        else:  # AWQ: plain RTN
            qlinear = QuantLinear.from_float(module, targets[name], name)
        set_submodule(model, name, qlinear.to(module.weight.device))
    model.lowbit_method = recipe.method  # type: ignore[attr-defined]
    return model


def _model_identity(model: nn.Module) -> dict[str, Any]:
    """What the model is, for a resume fingerprint: its config and (loaded from disk) its weight files' stamps."""
    config = getattr(model, "config", None)
    identity: dict[str, Any] = {"config": config.to_dict() if hasattr(config, "to_dict") else None}
    source = getattr(model, "lowbit_source", None)
    if source is not None and Path(source).is_dir():
        identity["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                             for p in sorted(Path(source).glob("*.safetensors"))]
    else:
        identity["params"] = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return identity


def _awq_block(block: nn.Module, prefix: str, jobs: dict[str, LayerJob], run: Any, targets: dict[str, Any],
               config: AWQConfig) -> None:
    """AWQ on one block: scale search + fold for each norm → linears group, then clipping search."""
    for norm_name, consumers in foldable_pairs(block, run).items():
        searched = [n for n in consumers if n in jobs]
        if not searched:
            continue
        sampler = jobs[searched[0]].stats
        weights = [linear_weight(jobs[n].module) for n in searched]
        scale = search_scale(sampler.rows(), sampler.abs_mean, weights, [targets[prefix + n] for n in searched], config)
        # every consumer is rescaled (targets or not) so the block's function is unchanged
        fold_into_norm(block.get_submodule(norm_name), [block.get_submodule(n) for n in consumers], scale)
        for n in consumers:
            if n in jobs:  # the linears now read x / s: keep their samples consistent
                jobs[n].stats.samples = [x / scale.to(x.device) for x in jobs[n].stats.samples]
                jobs[n].stats.abs_sum /= scale.double().cpu()
    if not config.clip:
        return
    for name, job in jobs.items():
        clipped = search_clip(job.stats.rows(), linear_weight(job.module), targets[prefix + name], config)
        with torch.no_grad():
            job.module.weight.copy_(clipped.t() if is_conv1d(job.module) else clipped)


def _require_memory(model: nn.Module, targets: dict[str, Any], calib: CalibConfig, batch_size: int,
                    recipe: QuantRecipe) -> None:
    """Under ``--max-memory``: refuse before any work when the estimated peak passes the cap.

    The estimate adds to the current RSS: the largest block's float weights (read lazily), the
    calibration activations (block inputs and outputs, plus one batch's MLP activations), the
    statistics and GPTQ's K×K transients, and the quantized layers kept until the model is saved.
    """
    from lowbit.algorithms.calibrate import find_blocks
    from lowbit.memory import budget_limit, require

    if budget_limit() is None or not targets:
        return
    lazy = getattr(model, "lowbit_lazy_blocks", None)
    blocks = find_blocks(model)[1]
    block_bytes = max((lazy.block_nbytes(i) for i in range(len(blocks))), default=0) if lazy is not None else 0
    dims = [linear_dims(model.get_submodule(name)) for name in targets]
    k_max = max(k for k, _ in dims)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    tokens = calib.samples * calib.seq_len
    activations = 2 * tokens * hidden * 4 + 4 * min(batch_size, calib.samples) * calib.seq_len * k_max * 4
    statistics = 4 * k_max * k_max * 4 if recipe.method == "gptq" else 2 * k_max * 4096 * 4
    quantized = sum(k * n for k, n in dims) * (max(spec.bits for spec in targets.values()) + 1) // 8
    require(block_bytes + activations + statistics + quantized, f"{recipe.method} calibration")
