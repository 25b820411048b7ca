"""``export_gguf``: a float, lowbit-quantized or merged model → one GGUF file llama.cpp runs.

Steps: load the model; (optionally) measure per-column input importance on calibration data (what
llama.cpp's imatrix holds); plan every tensor's GGUF name and block type (arch.py tables, mixes.py
rules, ``--tensor-type`` overrides, fallbacks); write header, metadata, tokenizer and tensor infos
with the ``gguf`` package's GGUFWriter; then stream tensor data one tensor at a time (quants.py),
into a temporary file that is fsynced and renamed. Lowbit integer weights whose grid is a GGUF type
are written code for code (``from_quantized_weight``), never re-rounded.
"""

from __future__ import annotations

import json
import re
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import ExportError, InvalidSpecError, OutputExistsError, ShapeError
from lowbit.io.gguf import arch as archmod
from lowbit.io.gguf import mixes
from lowbit.progress import progress


@dataclass
class TensorPlan:
    """One tensor of the output file: where it comes from and how it is stored."""

    name: str                      # GGUF name
    source: str                    # Hugging Face parameter / module name
    shape: tuple[int, ...]         # torch order: [rows, row length]
    qtype: str                     # GGUF block type name, e.g. "Q4_K"
    reason: str                    # "mix", "code-mapped int4-g128-asym", "fallback from Q4_K …", "float" …
    load: Callable[[], Any]        # → float tensor, or QuantizedWeight when code-mapped
    permute_heads: int | None = None   # llama's Q/K rows: permute for interleaved RoPE
    importance_key: str | None = None
    nbytes: int = 0


@dataclass
class ExportReport:
    out: str
    type: str
    file_bytes: int
    seconds: float
    tensors: int
    types: dict[str, int]
    code_mapped: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    importance: bool = False
    bits_per_weight: float = 0.0
    max_code_map_error: float = 0.0
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_gguf(model: str | Path | nn.Module, out: str | Path, *, type: str = "q4_k_m",
                calib: Any = None, tensor_types: list[str] | tuple[str, ...] = (), code_map: bool = True,
                overwrite: bool = False, show_progress: bool = True, source_dir: str | Path | None = None,
                tensor_plan: dict[str, str] | None = None) -> ExportReport:
    """Write ``model`` (a path/``builtin:`` name or a loaded lowbit/transformers model) as GGUF.

    Args:
        type: a llama.cpp file type (``mixes.MIXES``): f32, f16, bf16, q8_0, q4_0 … q4_k_m, q6_k.
        calib: a :class:`lowbit.algorithms.calib_data.CalibConfig`; when given, rounding is weighted by
            each input column's mean square on that data (llama.cpp's imatrix, measured by lowbit).
        tensor_types: ``PATTERN=TYPE`` overrides searched in GGUF tensor names (first match wins).
        code_map: write lowbit integer weights whose grid fits a GGUF type code for code.
        tensor_plan: {module name: GGUF type} from ``lowbit plan`` with GGUF candidates: those tensors get
            exactly those types (before ``tensor_types``; a tied head's type is token_embd's).
    """
    import gguf

    from lowbit.io.gguf import quants
    from lowbit.io.gguf.tokenizer import add_tokenizer

    start = time.perf_counter()
    out = Path(out)
    mix = mixes.resolve_mix(type)
    overrides = mixes.parse_tensor_types(list(tensor_types))
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    if isinstance(model, (str, Path)):
        from lowbit.io.checkpoint import load

        model = load(model)
    source = Path(source_dir) if source_dir is not None else getattr(model, "lowbit_source", None)
    if source is None:
        raise ExportError("the model does not say where it was loaded from; pass source_dir= (its tokenizer is needed)")
    config = model.config.to_dict()
    table = archmod.arch_for(config, str(Path(source) / "config.json"))
    n_head, n_kv, _ = archmod.head_dims(config)
    importance = collect_importance(model, source, calib, show_progress) if calib is not None else {}
    if tensor_plan:
        if mixes.MIXES[mix][0] in mixes.FLOAT_TYPES:
            raise InvalidSpecError(f"--plan gives block types; --type {type} is a float type (use e.g. q8_0 or the "
                                   "default q4_k_m for the tensors the plan leaves out)")
        overrides = _plan_overrides(model, tensor_plan) + overrides
    plans = plan_tensors(model, table, config, mix, overrides, code_map)
    for p in plans:
        p.importance_key = p.source if p.source in importance else None
        if p.name == "token_embd.weight" and not any(q.name == "output.weight" for q in plans):
            head = _head_name(model)  # tied: the embedding is also the output head; weight by the head's inputs
            p.importance_key = head if head in importance else None
        p.nbytes = quants.row_bytes(_qtype(p.qtype), p.shape[-1]) * (p.shape[0] if len(p.shape) == 2 else 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    from lowbit.io.writer import recover_output_dir

    recover_output_dir(out)  # temporary files of killed exports (their pid is in the name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    code_errors: list[float] = []
    try:
        writer = gguf.GGUFWriter(path=None, arch=table.gguf_arch)
        writer.add_name(Path(str(source)).name)
        writer.add_quantized_by(f"lowbit {_version()}")
        writer.add_file_type(int(getattr(gguf.LlamaFileType, mixes.MIXES[mix][1])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = archmod.write_hparams(writer, table, config)
        tok_report = add_tokenizer(writer, Path(source), vocab_size=int(model.get_input_embeddings().weight.shape[0]))
        _add_provenance(writer, model, mix, calib, plans, config)
        for name, tensor in extra:
            plans.append(TensorPlan(name, name, tuple(tensor.shape), "F32", "generated", (lambda t=tensor: t),
                                    nbytes=tensor.numel() * 4))
        for p in plans:
            writer.add_tensor_info(p.name, (p.shape[0], p.nbytes // p.shape[0]) if len(p.shape) == 2 else (p.nbytes,),
                                   _np_uint8(), p.nbytes, raw_dtype=_qtype(p.qtype))
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in progress(plans, desc=f"export {mix}", enabled=show_progress, unit="tensor"):
            data, err = _encode(p, importance, n_head, n_kv)
            if err is not None:
                code_errors.append(err)
            if data.numel() != p.nbytes:
                raise ExportError(f"{p.name}: encoded {data.numel()} bytes, planned {p.nbytes}")
            writer.write_tensor_data(data.numpy())
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    weights = [p for p in plans if len(p.shape) == 2]
    numel = sum(p.shape[0] * p.shape[1] for p in weights)
    return ExportReport(
        out=str(out), type=mix, file_bytes=out.stat().st_size, seconds=round(time.perf_counter() - start, 3),
        tensors=len(plans), types=dict(Counter(p.qtype for p in plans)),
        code_mapped=[p.name for p in plans if p.reason.startswith("code-mapped")],
        fallbacks=[f"{p.name}: {p.reason}" for p in plans if p.reason.startswith("fallback")],
        importance=bool(importance), bits_per_weight=round(8 * sum(p.nbytes for p in weights) / max(numel, 1), 4),
        max_code_map_error=max(code_errors, default=0.0), tokenizer=tok_report.to_dict()
        if hasattr(tok_report, "to_dict") else dict(tok_report or {}))


def plan_tensors(model: nn.Module, table: archmod.ArchTable, config: dict[str, Any], mix: str,
                 overrides: list, code_map: bool) -> list[TensorPlan]:
    """Name, type and source of every tensor llama.cpp's graph needs, in file order."""
    from lowbit.io.gguf import quants
    from lowbit.nn.quant_embedding import SharedQuantEmbedding
    from lowbit.nn.quant_linear import QuantLinear

    n_layers = int(config["num_hidden_layers"])
    n_head, n_kv, _ = archmod.head_dims(config)
    modules = dict(model.named_modules())
    # an embedding that reads the quantized head (tied_head: share) is written once, as token_embd (tied)
    shared = {name: m for name, m in modules.items() if isinstance(m, SharedQuantEmbedding)}
    tied = bool(shared) or _is_tied(model)
    plans: list[TensorPlan] = []
    sources: list[tuple[str, Any]] = [(f"{name}.weight", m.head) for name, m in shared.items()]
    for name, module in modules.items():
        if isinstance(module, QuantLinear):
            sources.append((f"{name}.weight", module))
            if module.bias is not None:
                sources.append((f"{name}.bias", module.bias))
    quant_names = {n.rsplit(".", 1)[0] for n, m in sources if isinstance(m, QuantLinear)}
    for pname, param in model.named_parameters(remove_duplicate=False):
        if pname.rsplit(".", 1)[0] in quant_names:
            continue
        sources.append((pname, param))
    seen: set[str] = set()
    for hf, obj in sources:
        gname = archmod.gguf_name(hf)
        if gname is None:
            raise ExportError(f"{hf}: this tensor has no place in llama.cpp's {table.gguf_arch} graph; "
                              "the GGUF writer cannot export this model faithfully")
        if gname == "output.weight" and tied:
            continue
        if gname in seen:
            continue
        seen.add(gname)
        category, layer = archmod.category_of(gname)
        permute = None
        if table.permute_qk and category in ("attn_q", "attn_k"):
            permute = n_head if category == "attn_q" else n_kv
        if isinstance(obj, QuantLinear):
            qw = obj.weight
            shape = tuple(qw.shape)
            slot = mixes.TensorSlot(gname, category, layer, n_layers, shape[1])
            choice = mixes.choose_type(mix, slot, tied=tied, n_gqa=n_head // n_kv, arch=table.gguf_arch,
                                       overrides=overrides)
            overridden = choice.reason.startswith("override")
            # a float --type asks for float weights; otherwise lowbit's codes go in as they are when a type fits
            wants_float = mixes.MIXES[mix][0] in mixes.FLOAT_TYPES
            mapped = quants.from_quantized_weight(qw) if code_map and not overridden and not wants_float else None
            if mapped is not None:
                qtype = _type_name(mapped[0])
                plans.append(TensorPlan(gname, hf, shape, qtype, f"code-mapped {qw.spec.describe()}",
                                        (lambda qw=qw: qw), permute))
            else:
                plans.append(TensorPlan(gname, hf, shape, choice.qtype, choice.reason,
                                        (lambda qw=qw: qw.dequantize(torch.float32)), permute))
            continue
        tensor = obj.detach()
        if tensor.dim() == 1:
            plans.append(TensorPlan(gname, hf, tuple(tensor.shape), "F32", "1-D", (lambda t=tensor: t.float()),
                                    permute))
            continue
        if tensor.dim() != 2:
            raise ExportError(f"{hf}: expected a 1-D or 2-D tensor, got shape {tuple(tensor.shape)}")
        slot = mixes.TensorSlot(gname, category, layer, n_layers, int(tensor.shape[1]))
        choice = mixes.choose_type(mix, slot, tied=tied, n_gqa=n_head // n_kv, arch=table.gguf_arch,
                                   overrides=overrides)
        plans.append(TensorPlan(gname, hf, tuple(tensor.shape), choice.qtype, choice.reason,
                                (lambda t=tensor: t.float()), permute))
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in seen]
    if missing:
        raise ExportError(f"the model lacks {', '.join(missing)}; cannot write a runnable GGUF")
    return plans


def _encode(p: TensorPlan, importance: dict[str, torch.Tensor], n_head: int, n_kv: int
            ) -> tuple[torch.Tensor, float | None]:
    """The bytes of one tensor (uint8, flat) and, when code-mapped, the max float error of the mapping."""
    from lowbit.io.gguf import quants
    from lowbit.tensor import QuantizedWeight

    obj = p.load()
    perm = archmod.qk_row_permutation(p.shape[0], p.permute_heads) if p.permute_heads else None
    if isinstance(obj, QuantizedWeight):
        mapped = quants.from_quantized_weight(obj)
        if mapped is None:
            raise ExportError(f"{p.source}: planned as code-mapped but the weight no longer fits a GGUF type")
        _, data, err = mapped
        if perm is not None:
            data = data[perm]
        return data.reshape(-1).contiguous(), float(err)
    tensor = obj
    if tensor.dim() == 1:
        tensor = tensor.reshape(1, -1)
    if perm is not None:
        tensor = tensor[perm]
    imp = importance.get(p.importance_key) if p.importance_key else None
    try:
        data = quants.quantize(tensor.contiguous(), _qtype(p.qtype), imp)
    except ShapeError as exc:
        raise ExportError(f"{p.source} → {p.name}: {exc}") from None
    return data.reshape(-1).contiguous(), None


def collect_importance(model: nn.Module, source: Path | str, calib: Any, show_progress: bool = True
                       ) -> dict[str, torch.Tensor]:
    """Mean square of each linear layer's input columns over the calibration windows: {module name: [K]}.

    This is what llama.cpp's imatrix stores, measured with lowbit's calibration data loader.
    """
    from transformers import AutoTokenizer

    from lowbit.algorithms.calib_data import calibration_batches
    from lowbit.models.targets import is_linear
    from lowbit.nn.quant_linear import QuantLinear

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    batches = calibration_batches(tokenizer, calib)
    sums: dict[str, torch.Tensor] = {}
    counts: Counter[str] = Counter()
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = x.pow(2).sum(0, dtype=torch.float64)
            sums[name] = sums[name] + acc if name in sums else acc
            counts[name] += x.shape[0]
        return fn

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or is_linear(module):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for row in progress(batches.split(1), desc="importance", enabled=show_progress, unit="window"):
                model(input_ids=row)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


def _add_provenance(writer: Any, model: nn.Module, mix: str, calib: Any, plans: list[TensorPlan],
                    config: dict[str, Any]) -> None:
    writer.add_string("general.lowbit.version", _version())
    writer.add_string("general.lowbit.type", mix)
    qcfg = config.get("quantization_config")
    if qcfg:
        writer.add_string("general.lowbit.recipe", json.dumps(qcfg, sort_keys=True))
    if calib is not None:
        from lowbit.algorithms.calib_data import read_calibration_text
        import hashlib

        text = read_calibration_text(calib)
        writer.add_string("general.lowbit.calibration", json.dumps({
            "source": str(calib.source), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed, "use": "importance"}))
    mapped = sum(p.reason.startswith("code-mapped") for p in plans)
    writer.add_uint32("general.lowbit.code_mapped_tensors", mapped)
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    writer.add_string("general.lowbit.hf_config", json.dumps(plain, sort_keys=True, default=str))


def _plan_overrides(model: nn.Module, tensor_plan: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    """Exact-name overrides for a plan's {module name: type}; a tied head names the shared token_embd."""
    modules = dict(model.named_modules())
    tied_head = _head_name(model) if _is_tied(model) else None
    out = []
    for name, qtype in tensor_plan.items():
        if name not in modules:
            raise InvalidSpecError(f"the plan names {name!r}, which is not a module of this model (planned for "
                                   "another model?)")
        gname = "token_embd.weight" if name == tied_head else archmod.gguf_name(f"{name}.weight")
        if gname is None:
            raise InvalidSpecError(f"the plan names {name!r}, which has no tensor in llama.cpp's graph")
        out.append((re.compile(f"^{re.escape(gname)}$"), qtype.upper()))
    return out


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _is_tied(model: nn.Module) -> bool:
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is None or out is None or not isinstance(getattr(inp, "weight", None), nn.Parameter):
        return False
    w_out = getattr(out, "weight", None)
    return isinstance(w_out, torch.Tensor) and w_out is inp.weight or (
        isinstance(w_out, torch.Tensor) and w_out.data_ptr() == inp.weight.data_ptr())


def _qtype(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name]


def _type_name(qtype: Any) -> str:
    import gguf

    return gguf.GGMLQuantizationType(int(qtype)).name


def _np_uint8() -> Any:
    import numpy as np

    return np.dtype(np.uint8)


def _version() -> str:
    from lowbit import __version__

    return __version__


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
