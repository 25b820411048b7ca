"""One layer-by-layer runner for every data-driven algorithm (GPTQ, AWQ, … and later pruning).

1. capture the inputs of the first transformer block for all calibration batches;
2. for each block: move it to the compute device, run it on those inputs with hooks that feed each
   target linear layer's inputs to a per-layer statistics object, let the algorithm replace the
   layers, run the (now quantized) block again to get the next block's inputs, move it back.
Generic over Hugging Face decoders and encoders: the block list is found, not hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lowbit.errors import InvalidWeightError, UnsupportedModelError
from lowbit.memory import check_budget, release_memory, return_large_allocations_to_os
from lowbit.models.targets import is_linear, set_submodule
from lowbit.nn.quant_linear import QuantLinear
from lowbit.progress import progress


class LayerStats(Protocol):
    def add_batch(self, x: torch.Tensor) -> None: ...


@dataclass
class LayerJob:
    """What the runner asks of an algorithm for one target layer."""

    name: str                 # full module name, e.g. model.layers.3.mlp.down_proj
    module: nn.Module         # the float linear layer (nn.Linear or Conv1D)
    stats: LayerStats
    last_user: bool = True    # False while later jobs of the stage still read the same (shared) stats


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor] = field(default_factory=list)   # per batch: [B, L, D]
    args: list[tuple] = field(default_factory=list)            # other positional args per batch
    kwargs: list[dict[str, Any]] = field(default_factory=list)  # attention masks, rotary tables, …


class _Captured(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer block list (``model.layers``, ``transformer.h``, ``encoder.layer`` …)."""
    config = getattr(model, "config", None)
    want = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if any(is_linear(m) for m in module[0].modules()):
                candidates.append((name, module))
    exact = [c for c in candidates if len(c[1]) == want]
    chosen = exact or sorted(candidates, key=lambda c: len(c[1]), reverse=True)
    if not chosen:
        raise UnsupportedModelError(f"{type(model).__name__}: found no repeated block list (an nn.ModuleList of "
                                    "identical layers containing linear layers, such as model.layers, transformer.h "
                                    "or encoder.layer); layer-by-layer calibration needs one")
    return chosen[0]


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]],
                         device: torch.device) -> BlockInputs:
    """Run the model up to its first block for each batch and record that block's inputs."""
    captured = BlockInputs()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(captured.hidden) != len(batches):
        raise UnsupportedModelError(f"{type(model).__name__}: the first block was not reached by the forward pass")
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer_by_layer(model: nn.Module, batches: list[dict[str, torch.Tensor]], *,
                       targets: dict[str, Any], make_stats: Callable[[str, nn.Module], LayerStats],
                       replace: Callable[[LayerJob], nn.Module], device: torch.device | str = "cpu",
                       prepare_block: Callable[[nn.Module, str, dict[str, LayerJob], Callable[[], Any]], None] | None = None,
                       sequential: bool = False, share_stats: bool = False,
                       show_progress: bool = True, checkpoint: Any = None) -> dict[str, nn.Module]:
    """Quantize the ``targets`` inside the model's blocks, block by block, on calibration ``batches``.

    Args:
        targets: {full module name: anything (e.g. its spec)}; only names inside blocks are handled here.
        make_stats: creates the statistics object a layer's inputs are fed to (e.g. a Hessian).
        replace: turns a LayerJob into the quantized module that takes the layer's place.
        prepare_block: optional; called with (block, "prefix.i.", {local name: LayerJob}, run) after the
            statistics are collected and before any layer is replaced, where ``run()`` runs the block on
            the first calibration batch — for transforms over several layers (AWQ's scale folding).
        sequential: quantize a block's layers stage by stage in execution order (layers reading the same
            input form a stage: q/k/v, then o_proj, then gate/up, then down_proj), each stage's statistics
            collected with the earlier stages already quantized ("true sequential" GPTQ).
        checkpoint: a :class:`~lowbit.algorithms.block_checkpoint.BlockCheckpoint`: finished blocks are saved
            to it, and blocks it already holds are restored instead of computed (a resumed run).
    Returns:
        {name: new module} of the layers replaced.
    """
    device = torch.device(device)
    return_large_allocations_to_os()
    prefix, blocks = find_blocks(model)
    lazy = getattr(model, "lowbit_lazy_blocks", None)  # blocks read from disk one at a time

    def home(block: nn.Module) -> torch.device:
        dev = next(block.parameters()).device
        return torch.device("cpu") if dev.type == "meta" else dev

    block_device = {id(b): home(b) for b in blocks}
    _move_outside_blocks(model, blocks, device)
    inputs = capture_block_inputs(model, blocks, batches, device)
    check_budget("after capturing the calibration inputs")
    done: dict[str, nn.Module] = {}
    for index in progress(range(len(blocks)), desc="calibrate", enabled=show_progress, unit="block"):
        if lazy is not None:
            lazy.materialize(index)
        block = blocks[index].to(device)
        block_prefix = f"{prefix}.{index}."
        if checkpoint is not None and checkpoint.done(index):  # resumed: put it back, run it for the next inputs
            done.update({block_prefix + n: m for n, m in checkpoint.restore(block, index).items()})
            inputs.hidden = _run_block(block, inputs)
            blocks[index] = block.to(block_device[id(blocks[index])])
            release_memory()
            continue
        layers = {n: m for n, m in block.named_modules() if n and is_linear(m) and block_prefix + n in targets}
        stages = _stages(block, layers, inputs) if sequential else [list(layers)]
        for stage in stages:
            jobs = _collect(block, block_prefix, {n: layers[n] for n in stage}, inputs, make_stats,
                            shared=share_stats and sequential)
            if prepare_block is not None:
                h0, a0, kw0 = inputs.hidden[0], inputs.args[0], inputs.kwargs[0]
                with torch.no_grad():
                    prepare_block(block, block_prefix, jobs, lambda: block(h0, *a0, **kw0))
            for name, job in jobs.items():
                new = replace(job).to(device)
                set_submodule(block, name, new)
                done[block_prefix + name] = new
            del jobs
        inputs.hidden = _run_block(block, inputs)
        for module in block.modules():  # kernel-layout copies made by that forward are not needed any more
            if isinstance(module, QuantLinear):
                module.reset_kernel()
        if checkpoint is not None:
            checkpoint.save(block, index)
        blocks[index] = block.to(block_device[id(blocks[index])])
        release_memory()  # the block's float weights and statistics are garbage now
        check_budget(f"after block {index}")
    return done


def _collect(block: nn.Module, block_prefix: str, layers: dict[str, nn.Module], inputs: BlockInputs,
             make_stats: Callable[[str, nn.Module], LayerStats], shared: bool = False) -> dict[str, LayerJob]:
    """Run the block on every calibration batch, feeding each layer's inputs to its statistics
    (``shared``: the layers read the same input, so the first layer's statistics serve them all)."""
    names = list(layers)
    if shared and names:
        one = make_stats(block_prefix + names[0], layers[names[0]])
        stats = {n: one for n in names}
        feeding = names[:1]
    else:
        stats = {n: make_stats(block_prefix + n, m) for n, m in layers.items()}
        feeding = names
    handles = [layers[n].register_forward_hook(_feeder(stats[n], block_prefix + n)) for n in feeding]
    try:
        _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: LayerJob(block_prefix + name, layers[name], stats[name],
                           last_user=not shared or i == len(names) - 1) for i, name in enumerate(names)}


@torch.no_grad()
def _stages(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """The block's target layers grouped by shared input tensor, in execution order."""
    order: list[tuple[int, str]] = []
    alive: list[torch.Tensor] = []  # inputs kept alive during the pass so their id()s stay unique

    def record(name: str, x: torch.Tensor) -> None:
        alive.append(x)
        order.append((id(x), name))

    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: record(name, args[0])) for n, m in layers.items()]
    try:
        block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
    finally:
        for h in handles:
            h.remove()
    stages: dict[int, list[str]] = {}
    for tensor_id, name in order:
        if name not in (n for stage in stages.values() for n in stage):
            stages.setdefault(tensor_id, []).append(name)
    return list(stages.values())


def _feeder(stats: LayerStats, name: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        try:
            stats.add_batch(args[0].detach())
        except FloatingPointError:
            raise InvalidWeightError(f"{name}: calibration activations contain NaN/Inf; the float model is broken "
                                     "on this data (check its weights and dtype)") from None
    return hook


@torch.no_grad()
def _run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [_block_output(block(h, *a, **kw)) for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs)]


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Put everything that runs before the first block (embeddings, rotary tables) on ``device``."""
    block_ids = {id(m) for b in blocks for m in b.modules()}
    for module in model.modules():
        if id(module) in block_ids:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device != device:
                module._parameters[name] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
