"""``lowbit.peft.finetune``: adapter + trainer + files, the pipeline behind ``lowbit finetune``.

The output directory is a Hugging Face peft adapter directory (``adapter_config.json``,
``adapter_model.safetensors``) that also holds the run: ``train_log.csv``/``.jsonl``, ``loss.png``,
``checkpoint/`` (for ``resume``) and ``lowbit_finetune.json`` (the base model, how lowbit quantized it
on the fly for QLoRA, the result figures), which ``load_with_adapter`` reads back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lowbit.errors import CorruptFileError
from lowbit.io.writer import prepare_run_dir, replace_durably, write_json_durably
from lowbit.peft.config import AdapterConfig
from lowbit.peft.model import apply_adapter, count_parameters
from lowbit.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, saved_config

RUN_FILE = "lowbit_finetune.json"


@dataclass
class FinetuneResult:
    out: str
    steps: int
    tokens: int
    tokens_per_s: float
    final_loss: float
    eval_loss: float | None
    initial_eval_loss: float | None
    peak_memory_bytes: int
    seconds: float
    trainable_params: int
    total_params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_base(model: nn.Module, spec_dict: dict[str, Any] | None) -> nn.Module:
    """QLoRA's base: quantize a float model's linear layers (not the head) in place by round-to-nearest."""
    if not spec_dict:
        return model
    import lowbit
    from lowbit.formats.spec import QuantSpec

    if getattr(model, "lowbit_method", None):  # already a lowbit-quantized model: keep its format
        return model
    return lowbit.quantize(model, QuantSpec.from_dict(spec_dict, "base quantization"))


def finetune(model: nn.Module, adapter: AdapterConfig, train_data: Any, train_config: Any, out: str | Path, *,
             eval_data: Any = None, adapter_name: str = "default", callbacks: Sequence[Any] = (),
             base: dict[str, Any] | None = None, overwrite: bool = False,
             data_source: str | None = None) -> FinetuneResult:
    """Add ``adapter`` to ``model``, train it with lowbit's trainer, write the peft adapter into ``out``.

    ``train_config`` is a :class:`lowbit.train.TrainConfig` (its ``out_dir`` is set to ``out``);
    ``base`` is recorded in ``lowbit_finetune.json`` (e.g. ``{"model": path, "quantize": spec dict}``).
    """
    import dataclasses

    from lowbit.train import Trainer
    from lowbit.train.distributed import init_distributed

    out = Path(out)
    rank0 = init_distributed().is_main
    if rank0:
        prepare_run_dir(out, resume=train_config.resume, overwrite=overwrite)
    import torch

    torch.manual_seed(train_config.seed)  # adapter initialisation is part of the run: --seed fixes it
    apply_adapter(model, adapter, adapter_name)
    trainable, total = count_parameters(model)
    callbacks = [*method_callbacks(model, adapter, adapter_name), *callbacks]
    config = dataclasses.replace(train_config, out_dir=out)
    trainer = Trainer(model, config, train_data, eval_data, callbacks=callbacks)
    initial = trainer.evaluate() if eval_data is not None else None  # the adapter starts as the base (or near)
    result = trainer.train()
    summary = FinetuneResult(str(out), result.steps, result.tokens, round(result.tokens_per_s, 2),
                             result.final_loss, result.eval_loss, initial, result.peak_memory_bytes,
                             round(result.seconds, 3), trainable, total)
    if rank0:
        write_adapter_files(model, out, adapter_name)
        write_json_durably(out / RUN_FILE, {"base": base or {}, "adapter_name": adapter_name, "result": summary.to_dict(),
                                     "data": data_source,
                                     "train_config": _jsonable(asdict(config))})
    return summary


def method_callbacks(model: nn.Module, config: AdapterConfig, name: str) -> list[Any]:
    """Training callbacks a method needs (AdaLoRA's rank-budget schedule)."""
    if config.peft_type == "ADALORA":
        from lowbit.peft.adalora import adalora_callbacks

        return list(adalora_callbacks(model, name))
    return []


def write_adapter_files(model: nn.Module, out: Path, name: str = "default") -> None:
    """Write the adapter's two peft files into the existing directory ``out``, each atomically."""
    from safetensors.torch import save_file

    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file(adapter_state_dict(model, name), str(tmp), metadata={"format": "pt"})
    replace_durably(tmp, out / WEIGHTS_NAME)
    write_json_durably(out / CONFIG_NAME, saved_config(model, name))


def read_run(adapter_dir: str | Path) -> dict[str, Any]:
    """``lowbit_finetune.json`` of an adapter directory ({} for adapters lowbit did not train)."""
    from lowbit.models.resolve import read_json

    path = Path(adapter_dir) / RUN_FILE
    if not path.is_file():
        return {}
    return read_json(path)


def load_with_adapter(model_ref: str | Path, adapter_dir: str | Path, *, name: str = "default",
                      device: str = "cpu") -> nn.Module:
    """Load ``model_ref``, quantize it as the adapter's run did (QLoRA on the fly), add the adapter."""
    import lowbit
    from lowbit.peft.peft_format import load_adapter

    base = read_run(adapter_dir).get("base") or {}
    if not isinstance(base, dict):
        raise CorruptFileError(f"{Path(adapter_dir) / RUN_FILE}: 'base' must be an object, got {type(base).__name__}")
    if base.get("loftq"):  # LoftQ chose the quantized base itself; it lives beside the adapter
        model_ref = Path(adapter_dir) / "base"
    model = lowbit.load(model_ref)
    quantize_base(model, base.get("quantize"))
    load_adapter(model, adapter_dir, name)
    return model.to(device).eval()


def _jsonable(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    if isinstance(data, (str, int, float, bool)) or data is None:
        return data
    return str(data)
