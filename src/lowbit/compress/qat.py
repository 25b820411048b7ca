"""Quantization-aware training: swap the linear layers for :class:`~lowbit.nn.fake_quant.FakeQuantLinear`,
train them block by block to reproduce the float model, convert to packed :class:`~lowbit.nn.QuantLinear`.

    result = qat(model, QATConfig(QuantSpec.int_(2, 64, symmetric=False), steps=640), tokenizer=tok, calib=calib)
    # model now holds packed QuantLinear layers that compute exactly what training simulated

Training is block-wise reconstruction (the Block-AP phase of EfficientQAT, Chen et al. 2024): for each decoder
block in turn, the target is the *float* block's output on the float model's hidden states, the input is the
hidden state coming out of the already trained quantized blocks, and the loss is their mean squared difference.
Optionally (``e2e_steps``) a second, end-to-end phase then trains the scales, zero-points (and adapters) of the
whole model to match the float model's next-token distributions (EfficientQAT's E2E-QP, as distillation).
The block's weights (straight-through rounding), its learnable scales (LSQ, as log-multipliers) and zero-points
are trained with AdamW under a cosine schedule. Each step sees a small batch of calibration windows; ``steps``
counts the optimizer steps per block. Why block-wise: on the built-in LM, end-to-end QAT on a small corpus
over-fits it (held-out perplexity got worse than the GPTQ start), and a GPTQ start is a poor one for training
(its error-compensated weights sit on grid points that a straight-through step only knocks off); a block's
output MSE against the float block is a dense, local target that does not over-fit and starts from
round-to-nearest ranges. Activations are not quantized here (weight-only formats).

QAT + LoRA (``lora_rank``, QA-LoRA, Xu et al. 2023): the base weights are the GPTQ result and stay frozen;
what trains is a group-wise adapter (A reads the input summed over each quantization group, so its update
is constant per row and group), the scales and float zero-points. Merging folds the adapter into the
zero-points exactly — the model stays on the integer grid and nothing is re-rounded.

``convert_qat`` stores exactly what the fake-quant forward computed (a test asserts the logits agree).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, InvalidWeightError
from lowbit.formats.act import ActSpec
from lowbit.formats.spec import QuantSpec
from lowbit.nn.fake_quant import FakeQuantLinear, check_spec
from lowbit.nn.quant_linear import QuantLinear

INITS = ("rtn", "gptq")


@dataclass(frozen=True)
class QATConfig:
    """One QAT run. ``steps``: optimizer steps per block, each on ``batch_size`` calibration windows.
    ``lora_rank`` > 0: QA-LoRA (frozen GPTQ base, group-wise adapter, float zero-points)."""

    spec: QuantSpec
    act_spec: ActSpec | None = None  # dynamic activation quantization trained along (W4A8 …)
    steps: int = 640
    batch_size: int = 2
    lr: float = 2e-4            # weights (full QAT) or adapters (QA-LoRA)
    lr_qparams: float = 2e-3    # log-scales and zero-points
    lora_rank: int = 0
    lora_alpha: float | None = None
    init: str | None = None     # default: rtn for full QAT, gptq for QA-LoRA
    seed: int = 0
    e2e_steps: int = 0          # then: end-to-end distillation from the float model (scales, zero-points, adapters)
    e2e_lr: float = 1e-4
    e2e_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.lora_rank and (self.spec.format != "int" or self.spec.symmetric):
            raise InvalidSpecError("QAT with --lora folds the adapter into the zero-points: use an asymmetric int "
                                   f"format, not {self.spec.describe()}")
        if self.lora_rank and self.spec.granularity != "group":
            raise InvalidSpecError("QAT with --lora needs group-wise scales (give a group size)")
        if self.lora_rank and not self.spec.float_zero:
            object.__setattr__(self, "spec", self.spec.replace(zero_dtype=self.spec.scale_dtype))
        check_spec(self.spec, self.act_spec)
        if self.init is not None and self.init not in INITS:
            raise InvalidSpecError(f"QAT init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.e2e_steps < 0 or self.e2e_lr <= 0:
            raise InvalidSpecError(f"QAT: e2e_steps ≥ 0 and e2e_lr > 0 (got {self.e2e_steps}, {self.e2e_lr})")
        for name in ("steps", "batch_size", "e2e_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InvalidSpecError(f"QAT {name} must be ≥ 1, got {getattr(self, name)}")
        if self.lora_rank < 0 or self.lr <= 0 or self.lr_qparams < 0:
            raise InvalidSpecError(f"QAT: lora_rank ≥ 0, lr > 0 and lr_qparams ≥ 0 (got {self.lora_rank}, {self.lr}, "
                                   f"{self.lr_qparams})")

    @property
    def start(self) -> str:
        return self.init or ("gptq" if self.lora_rank else "rtn")


@dataclass
class BlockFit:
    loss_start: float
    loss_end: float

    def to_dict(self) -> dict[str, float]:
        return {"mse_start": round(self.loss_start, 8), "mse_end": round(self.loss_end, 8)}


@dataclass
class QATResult:
    config: QATConfig
    layers: list[str] = field(default_factory=list)
    blocks: dict[int, BlockFit] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    e2e_loss: float | None = None  # the distillation loss (KL to the float model) at the end of the e2e phase

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"method": "qat-lora" if c.lora_rank else "qat", "format": c.spec.describe(), "spec": c.spec.to_dict(),
                "act": None if c.act_spec is None else c.act_spec.describe(),
                "init": c.start, "steps_per_block": c.steps, "batch_size": c.batch_size, "lr": c.lr,
                "lr_qparams": c.lr_qparams, "lora_rank": c.lora_rank, "calib_samples": self.samples,
                "e2e_steps": c.e2e_steps, "e2e_loss": self.e2e_loss,
                "layers": len(self.layers), "seconds": round(self.seconds, 3),
                "mse_start": round(sum(b.loss_start for b in self.blocks.values()), 8),
                "mse_end": round(sum(b.loss_end for b in self.blocks.values()), 8),
                "per_block": {str(i): b.to_dict() for i, b in self.blocks.items()}}


def prepare_qat(model: nn.Module, spec: QuantSpec, *, init: str = "rtn", tokenizer: Any = None, calib: Any = None,
                device: str | torch.device = "cpu", show_progress: bool = False,
                act_spec: ActSpec | None = None) -> list[str]:
    """Replace the layers ``lowbit quantize`` would quantize by FakeQuantLinear (in place); everything else is frozen.

    ``init="gptq"`` starts from the GPTQ model (its error-compensated weights, scales and zero-points, computed on
    ``calib``), ``"rtn"`` from the float weights with round-to-nearest ranges. ``spec`` may have float zero-points
    (the GPTQ start is then quantized with integer ones, which are exact floats). ``act_spec``: the layers'
    inputs are fake-quantized too (dynamic specs). Returns the layer names.
    """
    from lowbit.models.targets import check_target_shapes, select_targets, set_submodule
    from lowbit.recipe import QuantRecipe

    if init not in INITS:
        raise InvalidSpecError(f"QAT init {init!r}: choose one of {', '.join(INITS)}")
    if any(isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise InvalidSpecError("QAT starts from the float model (this one is already quantized)")
    check_spec(spec, act_spec)
    int_spec = spec.replace(zero_dtype="int") if spec.float_zero else spec
    recipe = QuantRecipe(int_spec, "gptq" if init == "gptq" else "rtn")
    targets = list(select_targets(model, recipe))
    if not targets:
        raise InvalidSpecError("the model has no linear layer to train")
    check_target_shapes(model, dict.fromkeys(targets, int_spec))
    start: dict[str, QuantLinear] = {}
    if init == "gptq":
        from lowbit.algorithms.calib_data import CalibConfig
        from lowbit.algorithms.ptq import quantize_calibrated

        quantized = quantize_calibrated(copy.deepcopy(model), recipe, tokenizer, calib or CalibConfig(), device=device,
                                        show_progress=show_progress)
        start = {n: quantized.get_submodule(n) for n in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if name in start:
            fq = FakeQuantLinear.from_quantized(start[name].weight, getattr(module, "bias", None), spec=spec,
                                                act_spec=act_spec)
        else:
            fq = FakeQuantLinear.from_linear(module, spec, name, act_spec=act_spec)
        set_submodule(model, name, fq.to(module.weight.device))
    return targets


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by the packed QuantLinear that computes the same (in place)."""
    from lowbit.models.targets import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            set_submodule(model, name, module.convert())
    model.lowbit_method = "qat"  # type: ignore[attr-defined]
    return model


def qat(model: nn.Module, config: QATConfig, *, tokenizer: Any = None, calib: Any = None,
        device: str | torch.device = "cpu", show_progress: bool = False, convert: bool = True,
        checkpoint_dir: str | Path | None = None, resume: bool = False) -> QATResult:
    """Quantization-aware training of a float model in place (block-wise reconstruction, see the module
    docstring); ``calib`` is a CalibConfig of the training windows. ``convert``: end with packed layers.

    ``checkpoint_dir``: each trained block's parameters are saved there (safetensors, atomically); with
    ``resume`` the blocks already saved by the same run (same config and data) are loaded instead of trained.
    """
    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
    from lowbit.algorithms.calibrate import capture_block_inputs, find_blocks

    started = time.perf_counter()
    device = torch.device(device)
    if tokenizer is None:
        from lowbit.quantize import load_tokenizer

        tokenizer = load_tokenizer(model)
    calib = calib or CalibConfig(samples=128)
    prefix, blocks = find_blocks(model)  # before the swap: the runner finds blocks by their linear layers
    teacher = copy.deepcopy(model).eval() if config.e2e_steps else None
    before = dict(model.named_modules())
    targets = prepare_qat(model, config.spec, init=config.start, tokenizer=tokenizer, calib=calib, device=device,
                          show_progress=show_progress, act_spec=config.act_spec)
    originals = {name: before[name] for name in targets}  # the float layers: the reconstruction targets
    if config.lora_rank:
        for i, name in enumerate(targets):
            layer = model.get_submodule(name)
            layer.freeze_codes()
            layer.add_group_lora(config.lora_rank, config.lora_alpha, seed=config.seed + i)
    result = QATResult(config, targets)
    ids = calibration_batches(tokenizer, calib)
    result.samples = int(ids.shape[0])
    batches = [{"input_ids": ids[i:i + config.batch_size], "attention_mask": torch.ones_like(ids[i:i + config.batch_size])}
               for i in range(0, ids.shape[0], config.batch_size)]
    model.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, batches, device)
    float_in, quant_in = list(inputs.hidden), list(inputs.hidden)
    from lowbit.progress import progress

    ckpt = None if checkpoint_dir is None else _Checkpoint(Path(checkpoint_dir), _fingerprint(config, calib, ids,
                                                                                                targets))
    done = ckpt.load(resume) if ckpt is not None else {}
    for index in progress(range(len(blocks)), desc="qat", enabled=show_progress, unit="block"):
        block = blocks[index]
        block_prefix = f"{prefix}.{index}."
        mine = {n[len(block_prefix):]: m for n, m in originals.items() if n.startswith(block_prefix)}
        float_out = _run(block, float_in, inputs, swap=mine)
        if index in done:
            result.blocks[index] = ckpt.restore(block, index, done[index])  # type: ignore[union-attr]
        else:
            result.blocks[index] = _fit_block(block, quant_in, float_out, inputs, config, f"{prefix}.{index}")
            if ckpt is not None:
                ckpt.save(block, index, result.blocks[index])
        quant_in = _run(block, quant_in, inputs)
        float_in = float_out
        for name in mine:
            originals.pop(block_prefix + name)
    if teacher is not None:
        result.e2e_loss = _end_to_end(model, teacher, ids, config, device, show_progress)
        del teacher
    model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(False)
    if convert:
        convert_qat(model)
    result.seconds = time.perf_counter() - started
    return result


def _end_to_end(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, config: QATConfig,
                device: torch.device, show_progress: bool) -> float:
    """EfficientQAT's second phase, with lowbit's distillation trainer: the whole quantized model learns the float
    model's next-token distributions (forward KL) on the training windows; only the scales, zero-points and
    adapters train (the weights/codes stay as the block phase left them)."""
    from lowbit.compress.distill import DistillTrainer
    from lowbit.train.data import TokenDataset
    from lowbit.train.trainer import TrainConfig

    for layer in model.modules():
        if isinstance(layer, FakeQuantLinear):
            for p in (layer.log_scale, layer.lora_A, layer.lora_B):
                if p is not None:
                    p.requires_grad_(True)
            layer.zero.requires_grad_(layer.spec.has_zero)
    data = TokenDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    train = TrainConfig(steps=config.e2e_steps, batch_size=config.e2e_batch_size, lr=config.e2e_lr, schedule="cosine",
                        seed=config.seed, show_progress=show_progress, log_every=max(1, config.e2e_steps // 10))
    model.train()
    result = DistillTrainer(model, train, data, teacher.to(device)).train()
    model.eval()
    return float(result.final_loss)


@torch.no_grad()
def _run(block: nn.Module, hidden: list[torch.Tensor], inputs: Any, swap: dict[str, nn.Module] | None = None) -> list[torch.Tensor]:
    """The block's outputs on every batch (``swap``: with these float layers in place of the fake-quant ones)."""
    from lowbit.models.targets import set_submodule

    saved = {name: block.get_submodule(name) for name in swap or {}}
    for name, module in (swap or {}).items():
        set_submodule(block, name, module)
    try:
        return [_out(block(h, *a, **kw)) for h, a, kw in zip(hidden, inputs.args, inputs.kwargs)]
    finally:
        for name, module in saved.items():
            set_submodule(block, name, module)


def _out(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach()


def _fit_block(block: nn.Module, quant_in: list[torch.Tensor], target: list[torch.Tensor], inputs: Any,
               config: QATConfig, where: str) -> BlockFit:
    """Train one block's fake-quant layers to map ``quant_in`` to the float block's ``target`` (MSE)."""
    layers = [m for m in block.modules() if isinstance(m, FakeQuantLinear)]
    main, qparams = [], []
    for layer in layers:
        if config.lora_rank:
            main += [layer.lora_A, layer.lora_B]
        else:
            layer.weight.requires_grad_(True)
            main.append(layer.weight)
        qparams += [p for p in (layer.log_scale, layer.zero) if p.requires_grad]
    groups = [{"params": main, "lr": config.lr}]
    if qparams and config.lr_qparams > 0:
        groups.append({"params": qparams, "lr": config.lr_qparams})
    else:
        for p in qparams:
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    start = _mse(block, quant_in, target, inputs)
    order: list[int] = []
    g = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        if not order:
            order = torch.randperm(len(quant_in), generator=g).tolist()
        b = order.pop()
        out = _out_grad(block(quant_in[b], *inputs.args[b], **inputs.kwargs[b]))
        loss = torch.nn.functional.mse_loss(out.float(), target[b].float())
        if not torch.isfinite(loss):
            raise InvalidWeightError(f"{where}: QAT loss became {loss.item()} (lower --lr / --lr-qparams)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    return BlockFit(start, _mse(block, quant_in, target, inputs))


def _out_grad(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _mse(block: nn.Module, hidden: list[torch.Tensor], target: list[torch.Tensor], inputs: Any) -> float:
    total = sum(torch.nn.functional.mse_loss(_out(block(h, *a, **kw)).float(), t.float()).item()
                for h, a, kw, t in zip(hidden, inputs.args, inputs.kwargs, target))
    return total / max(len(hidden), 1)


# ---- resumable runs -------------------------------------------------------------------------------------------
def _fingerprint(config: QATConfig, calib: Any, ids: torch.Tensor, targets: list[str]) -> str:
    """Same config, same training windows, same layers → the same run."""
    h = hashlib.sha256(json.dumps({"config": {**asdict(config), "spec": config.spec.to_dict()}, "targets": targets,
                                   "calib": asdict(calib) if calib is not None else None}, sort_keys=True,
                                  default=str).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:32]


class _Checkpoint:
    """``state.json`` ({fingerprint, finished blocks and their fits}) and ``block-<i>.safetensors`` per block."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.state: dict[str, Any] = {"format": "lowbit-qat-checkpoint", "fingerprint": fingerprint, "blocks": {}}

    def load(self, resume: bool) -> dict[int, BlockFit]:
        from lowbit.errors import CorruptFileError

        state_file = self.path / "state.json"
        if not resume or not state_file.is_file():
            return {}
        try:
            state = json.loads(state_file.read_text())
            blocks = {int(i): BlockFit(float(v["mse_start"]), float(v["mse_end"])) for i, v in state["blocks"].items()}
            fingerprint = state["fingerprint"]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:  # ValueError: JSON, UTF-8
            raise CorruptFileError(f"{state_file}: not a lowbit QAT checkpoint ({str(exc)[:200]}); delete it to start "
                                   "over") from None
        if fingerprint != self.fingerprint:
            raise InvalidSpecError(f"{state_file}: saved by a run with other settings or data; rerun with the same "
                                   "ones, or without --resume to start over")
        self.state["blocks"] = {str(i): f.to_dict() for i, f in blocks.items()}
        return blocks

    def save(self, block: nn.Module, index: int, fit: BlockFit) -> None:
        from safetensors.torch import save_file

        from lowbit.io.writer import replace_durably

        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in _block_state(block).items()}
        tmp = self.path / f".block-{index}.safetensors.tmp"
        save_file(tensors, str(tmp))
        replace_durably(tmp, self.path / f"block-{index}.safetensors")
        self.state["blocks"][str(index)] = fit.to_dict()
        tmp = self.path / ".state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        replace_durably(tmp, self.path / "state.json")

    def restore(self, block: nn.Module, index: int, fit: BlockFit) -> BlockFit:
        from lowbit.io.safetensors_io import open_safetensors

        file = self.path / f"block-{index}.safetensors"
        with open_safetensors(file) as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open handle)
        want = _block_state(block)
        from lowbit.errors import CorruptFileError
        from lowbit.tensor import all_finite

        if set(tensors) != set(want) or any(tensors[k].shape != want[k].shape for k in want):
            raise CorruptFileError(f"{file}: does not hold this block's QAT parameters; delete the checkpoint")
        bad = next((k for k, t in tensors.items() if not t.is_floating_point() or not all_finite(t)), None)
        if bad is not None:
            raise CorruptFileError(f"{file}: {bad} is {tensors[bad].dtype} or holds NaN/Inf; delete the checkpoint")
        with torch.no_grad():
            for name, p in want.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        return fit


def _block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p for n, m in block.named_modules() if isinstance(m, FakeQuantLinear)
            for k, p in m.named_parameters(recurse=False) if p is not None}

