"""The GPTQ checkpoint format (AutoGPTQ, GPTQModel, transformers + optimum, vLLM), both ways.

A Hugging Face model directory whose ``config.json`` carries ``quantization_config`` with
``"quant_method": "gptq"``. Float tensors keep their usual names; each quantized linear layer
``name`` with weight W [N, K] (N = out_features, K = in_features), ``b`` bits and groups of ``g``
input columns (G = K/g groups; per-channel: g = K, written as ``group_size: -1``) is stored as:

=============== ===================== ========================================================
tensor          dtype / shape         meaning
=============== ===================== ========================================================
name.qweight    int32 [K·b/32, N]     unsigned codes q[k, n] ∈ [0, 2^b), packed along K
name.qzeros     int32 [G, N·b/32]     zero-points, packed along N; ``gptq`` (v1) stores Z − 1
name.scales     float16 [G, N]        per-group scales
name.g_idx      int32 [K]             group of input column k: k // g (act-order files permute it)
name.bias       float [N]             only when the layer has a bias
=============== ===================== ========================================================

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − Z[g_idx[k], n])

Packing: along the packed dimension the codes form one little-endian bit stream, code i at bit
i·b, cut into int32 words. For 2/4/8 bits that is 32/b codes per word, low bits first; for 3 bits
32 codes fill three words and codes 10 and 21 straddle a word boundary (AutoGPTQ's layout). It is
the same bit stream as lowbit's own ``qdata`` rows (:mod:`lowbit.formats.packing`), so a layer
converts by reinterpreting bytes and transposing.

Zero-points: ``checkpoint_format: "gptq"`` (v1, AutoGPTQ's legacy, what transformers, vLLM and
GPTQModel's ``gptq`` format read) stores Z − 1 in each field; ``"gptq_v2"`` stores Z. A real zero
of 0 has no v1 field; the exporter shifts that group's codes up by one when its top code is
unused and refuses otherwise (use ``checkpoint_format="gptq_v2"`` or a symmetric spec). Reading v1
follows GPTQModel: for 2/4/8 bits the whole int32 word is incremented by 0x…0101 (a field that
holds 2^b − 1, written by a v2→v1 conversion that borrowed, carries into the next one); for 3 bits
each field is incremented modulo 8. Symmetric lowbit codes q ∈ [−2^(b−1), 2^(b−1)) are stored as
q + 2^(b−1) with the zero 2^(b−1) (v1 field 2^(b−1) − 1).

Only safetensors and JSON are read. Outputs are written atomically.
"""

from __future__ import annotations

import re
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFileError, ExportError, ModelNotFoundError, UnsupportedModelError
from lowbit.formats import codecs
from lowbit.formats.packing import pack, unpack
from lowbit.formats.spec import QuantSpec
from lowbit.io.checkpoint import _install_quant_linears, _load_weights, copy_aux_files, map_checkpoint_key
from lowbit.io.safetensors_io import open_safetensors, weight_files
from lowbit.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, atomic_output_dir, write_json
from lowbit.models.build import build_empty_model, output_head_name, tied_parameter_names
from lowbit.models.resolve import read_json, resolve_model_dir
from lowbit.models.targets import is_conv1d, is_linear, linear_dims
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight

QUANT_METHOD = "gptq"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)
EXPORT_FORMAT_VERSION = 1
DEFAULT_DAMP_PERCENT = 0.05  # lowbit's GPTQ dampening (algorithms.gptq.GPTQConfig.damp); (0, 1) for transformers
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_SCALE_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# ---- packing: codes ⇄ int32 words (pure tensor functions) -------------------------------------
def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (uint8 [..., L], values < 2^bits, L·bits a multiple of 32) along the last dim
    into int32 [..., L·bits/32]: one little-endian bit stream, code i at bit i·bits."""
    length = codes.shape[-1]
    if (length * bits) % 32 or (bits < 8 and length % 8):
        raise ValueError(f"{length} codes of {bits} bits do not fill whole int32 words")
    return bytes_to_words(pack(codes, bits))


def unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 [..., W] → uint8 codes [..., count] (count·bits = 32·W)."""
    return unpack(words_to_bytes(words), bits, count)


def bytes_to_words(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4m] → int32 [..., m], little-endian (a copy-free reinterpretation)."""
    _require_little_endian()
    flat = data.contiguous().reshape(-1)
    if flat.storage_offset() % 4:
        flat = flat.clone()
    return flat.view(torch.int32).reshape(*data.shape[:-1], data.shape[-1] // 4)


def words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., m] → uint8 [..., 4m], little-endian (a copy-free reinterpretation)."""
    _require_little_endian()
    return words.contiguous().reshape(-1).view(torch.uint8).reshape(*words.shape[:-1], words.shape[-1] * 4)


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise UnsupportedModelError("GPTQ conversion reinterprets little-endian int32 words; this host is big-endian")


def _v1_increment(bits: int) -> int:
    """The int32 word that adds 1 to every ``bits``-wide field (0x11111111 for 4 bits)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def decode_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """Real zero-points int64 [G, N] from stored ``qzeros`` int32 [G, N·bits/32] (GPTQModel's reading)."""
    if checkpoint_format == "gptq_v2":
        return unpack_words(qzeros, bits, out_features).long()
    if bits == 3:  # fields straddle words: shift each field, modulo 2^3
        return (unpack_words(qzeros, bits, out_features).long() + 1) & 7
    word = (qzeros.long() + _v1_increment(bits)) & 0xFFFFFFFF  # whole-word add: a field at 2^b − 1 carries
    word = word - ((word >> 31) << 32)  # back to the signed int32 range
    return unpack_words(word.to(torch.int32), bits, out_features).long()


def encode_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Stored ``qzeros`` int32 [G, N·bits/32] for real zero-points [G, N] (each in 1..2^b − 1 for v1)."""
    fields = zeros.long() - (1 if checkpoint_format == "gptq" else 0)
    if fields.numel() and (fields.min() < 0 or fields.max() >= (1 << bits)):
        raise ValueError(f"zero-points out of range for {checkpoint_format} at {bits} bits")
    return pack_words(fields.to(torch.uint8), bits)


# ---- export ------------------------------------------------------------------------------------
def export_gptq(model: nn.Module, out: str | Path, *, overwrite: bool = False, source_dir: str | Path | None = None,
                checkpoint_format: str = "gptq", max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a lowbit model (int 2/3/4/8-bit layers, one bits/group size) as a GPTQ model directory.

    Float tensors are written as :func:`lowbit.save` writes them (tied copies left out); each
    :class:`QuantLinear` becomes ``qweight``/``qzeros``/``scales``/``g_idx`` (+ ``bias``), codes
    unchanged; the ``quantization_config`` also goes to ``quantize_config.json`` (AutoGPTQ's file,
    which GPTQModel reads first). Scales that are not plain float16 (bf16/fp32, double-quantized) are converted to
    float16 and the largest change of a dequantized weight is reported in a warning and in
    ``quantization_config.lowbit.scale_conversion``. Tokenizer files are copied from ``source_dir``
    (default: the directory the model was loaded from).

    Raises:
        ExportError: naming the layer, for non-int formats (nf4/fp4/fp8/fp16), float zero-points
            (HQQ), bits other than 2/3/4/8, per-tensor scales, layers with activation quantization,
            layers whose bits or group size differ from the others', dimensions that do not fill
            int32 words, quantized layers outside the transformer blocks (other than the output
            head), and — for v1 — a zero-point of 0 that cannot be shifted.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"checkpoint_format {checkpoint_format!r}: expected one of {CHECKPOINT_FORMATS}")
    if getattr(model, "config", None) is None:
        raise ExportError(f"{type(model).__name__}: GPTQ export needs a Hugging Face model (with .config)")
    out = Path(out)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ExportError("the model has no quantized layers; quantize it (int 2/3/4/8-bit) before exporting GPTQ")
    bits, group_size = _common_layout(layers)
    placement = _placement(model, layers)
    source = Path(source_dir) if source_dir is not None else getattr(model, "lowbit_source", None)
    tied = tied_parameter_names(model)
    max_error, converted = 0.0, 0
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        state = model.state_dict()
        written: set[str] = set()
        for name, tensor in state.items():
            owner, _, leaf = name.rpartition(".")
            if owner in layers and leaf != "bias":
                if owner not in written:
                    tensors, error = gptq_layer_tensors(layers[owner].weight, owner, checkpoint_format)
                    for key, value in tensors.items():
                        writer.add(f"{owner}.{key}", value)
                    written.add(owner)
                    if error is not None:
                        max_error, converted = max(max_error, error), converted + 1
                continue
            source_tensor = state.get(tied.get(name, ""))
            if source_tensor is not None and source_tensor.data_ptr() == tensor.data_ptr():
                continue  # tied copy: restored from its source on load
            writer.add(name, tensor)
        writer.finish()
        config = getattr(model, "config").to_dict()  # noqa: B009 (typed as Tensor | Module otherwise)
        config.pop("quantization_config", None)
        if not config.get("architectures"):
            config["architectures"] = [type(model).__name__]
        qcfg = _quantization_config(model, layers, bits, group_size, checkpoint_format, placement)
        if converted:
            qcfg["lowbit"]["scale_conversion"] = {"layers": converted, "max_abs_dequant_error": max_error}
            warnings.warn(f"GPTQ export: scales of {converted} layer(s) converted to float16 (codes unchanged); "
                          f"largest change of a dequantized weight {max_error:.3g}", stacklevel=2)
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        if source is not None:
            copy_aux_files(Path(source), tmp)
            (tmp / "quant_config.json").unlink(missing_ok=True)  # a GPTQ/AWQ source's own, now stale
        write_json(tmp / "quantize_config.json", qcfg)  # AutoGPTQ reads it; GPTQModel prefers it to config.json
    return out


def gptq_layer_tensors(weight: QuantizedWeight, name: str, checkpoint_format: str = "gptq"
                       ) -> tuple[dict[str, torch.Tensor], float | None]:
    """GPTQ tensors (qweight, qzeros, scales, g_idx; see the module table) of one stored weight,
    and the largest dequantized-weight change caused by converting its scales to float16 (None
    when they already were float16)."""
    spec = weight.spec
    _check_exportable(spec, weight.shape, name)
    k = weight.shape[1]
    bits = spec.bits
    group = spec.group_size if spec.group_size is not None else k  # per-channel: one group of K
    qdata = weight.tensors["qdata"]
    zero_point = weight.zero_point
    assert zero_point is not None  # int formats always have one (0 when symmetric)
    zeros = zero_point.round().long()  # [N, G]
    if spec.symmetric:
        zeros = zeros + (1 << (bits - 1))  # lowbit stores symmetric codes with this offset
    if checkpoint_format == "gptq" and bool((zeros == 0).any()):
        qdata, zeros = _shift_zero_groups(qdata, zeros, bits, k, group, name)
    scales, error = _fp16_scales(weight, name)
    tensors = {
        "qweight": bytes_to_words(qdata).t().contiguous(),                      # [K·b/32, N]
        "qzeros": encode_qzeros(zeros.t().contiguous(), bits, checkpoint_format),  # [G, N·b/32]
        "scales": scales.t().contiguous(),                                        # [G, N]
        "g_idx": (torch.arange(k, dtype=torch.int32) // group).to(torch.int32),   # [K]
    }
    return tensors, error


def _check_exportable(spec: QuantSpec, shape: tuple[int, int], name: str) -> None:
    n, k = shape
    if spec.format != "int":
        raise ExportError(f"{name}: {spec.describe()} is not an integer format; GPTQ stores int 2/3/4/8-bit codes")
    if spec.float_zero:
        raise ExportError(f"{name}: {spec.describe()} has real-valued (float) zero-points, as HQQ makes; GPTQ "
                          "stores integer zero-points")
    if spec.bits not in GPTQ_BITS:
        raise ExportError(f"{name}: {spec.bits}-bit codes; GPTQ's format has 2, 3, 4 or 8 bits")
    if spec.granularity == "tensor":
        raise ExportError(f"{name}: per-tensor scales; GPTQ needs per-channel or per-group scales")
    for what, dim in (("in_features", k), ("out_features", n)):
        if (dim * spec.bits) % 32 or (spec.bits < 8 and dim % 8):
            raise ExportError(f"{name}: {what}={dim} does not fill whole int32 words at {spec.bits} bits")


def _shift_zero_groups(qdata: torch.Tensor, zeros: torch.Tensor, bits: int, k: int, group: int,
                       name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """v1 cannot store a zero-point of 0: move those groups' codes and zero up by one (same values)."""
    n = zeros.shape[0]
    codes = unpack(qdata, bits, k).reshape(n, k // group, group)
    hit = zeros == 0
    if bool((codes.amax(dim=-1)[hit] == (1 << bits) - 1).any()):
        raise ExportError(f"{name}: {int(hit.sum())} group(s) have zero-point 0 and use the top code; GPTQ's v1 "
                          "format cannot store them. Export with checkpoint_format='gptq_v2' or quantize "
                          "symmetrically")
    codes = codes + hit.unsqueeze(-1).to(codes.dtype)
    return pack(codes.reshape(n, k), bits), zeros + hit.long()


def _fp16_scales(weight: QuantizedWeight, name: str) -> tuple[torch.Tensor, float | None]:
    """Scales [N, G] as float16, and the max |ΔW| the conversion causes (None when exact)."""
    spec = weight.spec
    if spec.scale_dtype == "float16" and not spec.double_quant:
        return weight.tensors["scale"].to(torch.float16), None
    scale = weight.scale  # float32 [N, G]
    assert scale is not None
    if not torch.isfinite(scale).all() or scale.abs().max() > torch.finfo(torch.float16).max:
        raise ExportError(f"{name}: scales exceed the float16 range that GPTQ stores them in")
    half = scale.clamp(min=2.0**-24).to(torch.float16)
    spec16 = spec.replace(scale_dtype="float16", double_quant=False)
    tensors = {"qdata": weight.tensors["qdata"], "scale": half}
    if spec.has_zero:
        tensors["zero"] = weight.tensors["zero"]
    error = (weight.dequantize() - codecs.decode(tensors, spec16, weight.shape)).abs().max().item()
    return half, error


def _common_layout(layers: dict[str, QuantLinear]) -> tuple[int, int]:
    """The one (bits, group_size) every layer shares (group_size −1: per-channel); checks each layer."""
    first_name, layout = None, None
    for name, module in layers.items():
        if module.act_spec is not None:
            raise ExportError(f"{name}: quantizes its activations ({module.act_spec.describe()}); GPTQ is weight-only")
        if module.weight.device.type == "meta":
            raise ExportError(f"{name}: weights not loaded (lazy blocks); load the model fully before exporting")
        spec = module.spec
        _check_exportable(spec, (module.out_features, module.in_features), name)
        this = (spec.bits, spec.group_size if spec.group_size is not None else -1)
        if layout is None:
            first_name, layout = name, this
        elif this != layout:
            raise ExportError(f"{name}: {this[0]} bits, group size {this[1]} differs from {first_name}'s {layout[0]} "
                              f"bits, group size {layout[1]}; GPTQ's config holds one bits/group_size for all layers")
    assert layout is not None
    return layout


def _placement(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, Any]:
    """Where the quantized layers sit, in the terms GPTQ loaders read: whether the output head is
    quantized (``lm_head``) and, when some block linears stay float, which ones are quantized."""
    from lowbit.algorithms.calibrate import find_blocks

    try:
        prefix, blocks = find_blocks(model)
    except UnsupportedModelError as exc:
        raise ExportError(f"GPTQ loaders quantize the layers of the transformer blocks: {exc}") from None
    head = output_head_name(model)
    for name in layers:
        if not name.startswith(prefix + ".") and name != head:
            raise ExportError(f"{name}: quantized, but outside the transformer blocks ({prefix}.N) and not the output "
                              "head; GPTQ loaders would not read it")
    float_names: list[str] = []
    per_block: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for i, block in enumerate(blocks):
        quantized: list[str] = []
        floats: list[str] = []
        for rel, module in block.named_modules():
            if rel and is_linear(module):
                (quantized if isinstance(module, QuantLinear) else floats).append(rel)
                if not isinstance(module, QuantLinear):
                    float_names.append(f"{prefix}.{i}.{rel}")
        per_block.add((tuple(quantized), tuple(floats)))
    placement: dict[str, Any] = {"lm_head": head in layers, "block_name": prefix}
    if float_names:
        if len(per_block) != 1:
            raise ExportError(f"{float_names[0]}: stays float while the same layer of other blocks is quantized; "
                              "GPTQ configs name the quantized layers once for every block")
        placement["modules_in_block_to_quantize"] = [list(next(iter(per_block))[0])]
        placement["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in float_names}
    return placement


def _quantization_config(model: nn.Module, layers: dict[str, QuantLinear], bits: int, group_size: int,
                         checkpoint_format: str, placement: dict[str, Any]) -> dict[str, Any]:
    from lowbit import __version__

    sym = all(m.spec.symmetric for m in layers.values())
    specs: dict[str, int] = {}
    for module in layers.values():
        specs[module.spec.describe()] = specs.get(module.spec.describe(), 0) + 1
    qcfg: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "method": QUANT_METHOD,
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": DEFAULT_DAMP_PERCENT,
        "lm_head": placement["lm_head"],
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lowbit:{__version__}"], "damp_percent": DEFAULT_DAMP_PERCENT,
                 "static_groups": False, "true_sequential": True},
    }
    if "modules_in_block_to_quantize" in placement:
        qcfg["block_name_to_quantize"] = placement["block_name"]
        qcfg["modules_in_block_to_quantize"] = placement["modules_in_block_to_quantize"]
        qcfg["dynamic"] = placement["dynamic"]
    source = getattr(model, "lowbit_source", None)
    qcfg["lowbit"] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "lowbit_version": __version__,
        "method": getattr(model, "lowbit_method", None) or "rtn",
        "source": None if source is None else str(source),
        "specs": specs,
    }
    return qcfg


# ---- import ------------------------------------------------------------------------------------
def is_gptq_dir(path: str | Path) -> bool:
    """Whether ``path`` is a GPTQ model directory (config.json ``quantization_config.quant_method`` is
    ``gptq``, or AutoGPTQ's older separate quantize_config.json). Never raises for a bad path."""
    try:
        _gptq_config(Path(path))
    except (CorruptFileError, ModelNotFoundError, UnsupportedModelError, OSError):
        return False
    return True


def load_gptq(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Read a GPTQ model directory (``gptq`` v1 or ``gptq_v2``; sym or asym; act-order) into a lowbit model.

    Each quantized layer becomes a :class:`QuantLinear` with the matching int spec (bits, group
    size or per-channel, symmetric when every zero-point is 2^(b−1), integer zero-points otherwise,
    the file's scale dtype), codes and scales unchanged, so it computes what the file means.
    Layers whose ``g_idx`` is not ``k // group_size`` (act-order files) cannot be expressed with
    lowbit's contiguous groups: they are dequantized exactly (in float32, then cast to ``dtype``)
    into plain float linears, with a warning giving their number. GPTQModel's ``dynamic``
    per-module bits/group_size overrides are honoured. Float tensors are cast to ``dtype``.

    Raises:
        CorruptFileError: naming the file and tensor, for wrong shapes/dtypes, g_idx out of range,
            missing tensors or malformed config fields.
        UnsupportedModelError: for formats lowbit does not read (marlin, bitblas, gptq_p …),
            bits other than 2/3/4/8, pack dtypes other than int32.
    """
    path = resolve_model_dir(path)
    qcfg, where = _gptq_config(path)
    config = read_json(path / "config.json")
    base = _base_params(qcfg, where)
    model = build_empty_model(config, str(path / "config.json"))
    files = weight_files(path)
    specs: dict[str, QuantSpec] = {}
    stored: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    overflow = 0
    with ExitStack() as stack:
        handles = {f: stack.enter_context(open_safetensors(f)) for f in files}
        index = {key: f for f, h in handles.items() for key in h.keys()}  # noqa: SIM118 (safe_open handle)
        for name, prefix in _quantized_modules(model, index, path).items():
            module = model.get_submodule(name)
            bits, group_size = _module_params(qcfg, base, prefix, where)
            raw = {t: handles[index[f"{prefix}.{t}"]].get_tensor(f"{prefix}.{t}")
                   for t in LAYER_TENSORS if f"{prefix}.{t}" in index}
            if getattr(module, "bias", None) is not None and f"{prefix}.bias" not in index:
                raise CorruptFileError(f"{path}: checkpoint lacks {prefix}.bias, which the model's layer has")
            layer = GPTQLayer.from_tensors(raw, bits, group_size, linear_dims(module), base["format"],
                                           lambda t, p=prefix: f"{index.get(f'{p}.{t}', path)}: tensor {p}.{t}")
            overflow += layer.overflow_fields
            converted = layer.to_lowbit()
            if converted is None:
                dense[name] = layer.dequantize()
            else:
                specs[name], stored[name] = converted
    quantized = _install_quant_linears(model, specs, where)
    for name, tensors in stored.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        _assign_buffers(module, tensors, name)
    for name, weight in dense.items():
        _assign_dense(model, name, weight, dtype)
    _load_weights(model, path, dtype, quantized)
    if dense:
        warnings.warn(f"{path}: {len(dense)} act-order layer(s) (g_idx not k // group_size) cannot be expressed "
                      "with lowbit's contiguous groups; they were dequantized exactly into float linears", stacklevel=2)
    if overflow:
        warnings.warn(f"{path}: {overflow} v1 zero-point field(s) hold 2^bits − 1 (a zero of 0 written with a "
                      "borrow); read as GPTQModel reads them — vLLM/exllama kernels read them differently",
                      stacklevel=2)
    setattr(model, "lowbit_source", path)  # noqa: B010 (an attribute lowbit's loaders set on the model)
    setattr(model, "lowbit_method", "gptq")  # noqa: B010
    return model.to(device).eval()


class GPTQLayer:
    """One validated GPTQ layer: codes, real zero-points and scales of a weight W [N, K].

    ``qdata`` uint8 [N, K·b/8] (lowbit's packed rows), ``zeros`` int64 [G, N], ``scales`` float [G, N],
    ``g_idx`` int64 [K].
    """

    def __init__(self, qdata: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, shape: tuple[int, int], overflow_fields: int = 0) -> None:
        self.qdata, self.zeros, self.scales, self.g_idx = qdata, zeros, scales, g_idx
        self.bits, self.group_size, self.shape, self.overflow_fields = bits, group_size, shape, overflow_fields

    @classmethod
    def from_tensors(cls, raw: dict[str, torch.Tensor], bits: int, group_size: int, dims: tuple[int, int],
                     checkpoint_format: str, where: Any) -> GPTQLayer:
        """Validate a layer's stored tensors (``where(tensor name)`` names one in errors); ``dims`` is
        (in_features K, out_features N) of the model's layer; ``group_size`` −1 means per-channel."""
        k, n = dims
        for t in ("qweight", "qzeros", "scales"):
            if t not in raw:
                raise CorruptFileError(f"{where('qweight')}: has no companion tensor {t}")
        group = k if group_size == -1 else group_size
        n_groups = -(-k // group)
        if (k * bits) % 32 or (n * bits) % 32 or (bits < 8 and (k % 8 or n % 8)):
            raise UnsupportedModelError(f"{where('qweight')}: {k}×{n} layer does not fill whole int32 words at "
                                        f"{bits} bits; lowbit reads such GPTQ layers only when it does")
        expect = {"qweight": ((k * bits // 32, n), (torch.int32,)),
                  "qzeros": ((n_groups, n * bits // 32), (torch.int32,)),
                  "scales": ((n_groups, n), (torch.float16, torch.bfloat16, torch.float32)),
                  "g_idx": ((k,), (torch.int32, torch.int64))}
        for t, (shape, dtypes) in expect.items():
            if t not in raw:
                continue
            tensor = raw[t]
            if tuple(tensor.shape) != shape:
                raise CorruptFileError(f"{where(t)}: shape {tuple(tensor.shape)}, expected {shape} for a {k}→{n} "
                                       f"layer at {bits} bits, group size {group_size}")
            if tensor.dtype not in dtypes:
                raise CorruptFileError(f"{where(t)}: dtype {tensor.dtype}, expected "
                                       f"{' or '.join(str(d) for d in dtypes)}")
        scales = raw["scales"]
        if not torch.isfinite(scales).all():
            raise CorruptFileError(f"{where('scales')}: holds NaN or Inf")
        g_idx = raw["g_idx"].long() if "g_idx" in raw else torch.arange(k) // group
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= n_groups):
            raise CorruptFileError(f"{where('g_idx')}: values must lie in [0, {n_groups}), found "
                                   f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        qzeros = raw["qzeros"]
        overflow = 0
        if checkpoint_format == "gptq":
            overflow = int((unpack_words(qzeros, bits, n) == (1 << bits) - 1).sum())
        zeros = decode_qzeros(qzeros, bits, n, checkpoint_format)
        qdata = words_to_bytes(raw["qweight"].t())  # [N, K·b/8]
        return cls(qdata, zeros, scales, g_idx, bits, group_size, (n, k), overflow)

    @property
    def lowbit_group_size(self) -> int | None:
        """lowbit's group size for this layer (None: per-channel), or 0 when its groups are not
        contiguous whole groups of columns (act-order g_idx, a partial last group)."""
        k = self.shape[1]
        if self.group_size == -1 or self.group_size > k:
            return None if torch.equal(self.g_idx, torch.zeros(k, dtype=torch.long)) else 0
        group = self.group_size
        return group if k % group == 0 and torch.equal(self.g_idx, torch.arange(k) // group) else 0

    def to_lowbit(self) -> tuple[QuantSpec, dict[str, torch.Tensor]] | None:
        """(spec, stored tensors) of the equivalent lowbit weight, or None for act-order layers."""
        group = self.lowbit_group_size
        if group == 0:
            return None
        bits = self.bits
        symmetric = bool((self.zeros == 1 << (bits - 1)).all())
        spec = QuantSpec.int_(bits, group, symmetric=symmetric, scale_dtype=_SCALE_DTYPE_NAMES[self.scales.dtype])
        tensors = {"qdata": self.qdata, "scale": self.scales.t().contiguous()}
        if not symmetric:
            tensors["zero"] = pack(self.zeros.t().to(torch.uint8), bits)
        return spec, tensors

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32: scales[g_idx[k], n] · (q[k, n] − Z[g_idx[k], n])."""
        k = self.shape[1]
        codes = unpack(self.qdata, self.bits, k).float()          # [N, K]
        zeros = self.zeros.float().t()[:, self.g_idx]              # [N, K]
        scales = self.scales.float().t()[:, self.g_idx]            # [N, K]
        return (codes - zeros) * scales


def _gptq_config(path: Path) -> tuple[dict[str, Any], str]:
    """The GPTQ ``quantization_config`` of a directory and where it came from."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path}: no config.json")
    qcfg = read_json(config_path).get("quantization_config")
    where = f"{config_path}: quantization_config"
    if not qcfg and (path / "quantize_config.json").is_file():  # AutoGPTQ before transformers integration
        qcfg = read_json(path / "quantize_config.json")
        where = str(path / "quantize_config.json")
        qcfg.setdefault("quant_method", QUANT_METHOD if "bits" in qcfg and "group_size" in qcfg else None)
    if not isinstance(qcfg, dict) or str(qcfg.get("quant_method", "")).lower() != QUANT_METHOD:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        raise UnsupportedModelError(f"{where}: quant_method {method!r} is not 'gptq'")
    return qcfg, where


def _base_params(qcfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated file-wide fields: bits, group_size (−1: per-channel), format."""
    fmt = qcfg.get("checkpoint_format")
    other = qcfg.get("format")
    if fmt is not None and other is not None and str(fmt).lower() != str(other).lower():
        raise CorruptFileError(f"{where}: checkpoint_format {fmt!r} and format {other!r} disagree")
    fmt = str(fmt or other or "gptq").lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise UnsupportedModelError(f"{where}: checkpoint format {fmt!r}; lowbit reads {CHECKPOINT_FORMATS}")
    pack_dtype = str(qcfg.get("pack_dtype", "int32")).lower().removeprefix("torch.")
    if pack_dtype != "int32":
        raise UnsupportedModelError(f"{where}: pack_dtype {pack_dtype!r}; lowbit reads int32-packed GPTQ files")
    bits, group_size = _check_bits_group(qcfg.get("bits"), qcfg.get("group_size", 128), where)
    return {"format": fmt, "bits": bits, "group_size": group_size}


def _check_bits_group(bits: Any, group_size: Any, where: str) -> tuple[int, int]:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise CorruptFileError(f"{where}: 'bits' must be an integer, got {bits!r}")
    if bits not in GPTQ_BITS:
        raise UnsupportedModelError(f"{where}: {bits}-bit GPTQ; lowbit reads {GPTQ_BITS}-bit files")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size < 1 and group_size != -1):
        raise CorruptFileError(f"{where}: 'group_size' must be a positive integer or -1, got {group_size!r}")
    return bits, group_size


def _module_params(qcfg: dict[str, Any], base: dict[str, Any], name: str, where: str) -> tuple[int, int]:
    """(bits, group_size) of module ``name``: GPTQModel's ``dynamic`` (first matching regex wins;
    ``-:`` patterns exclude a module) over the file-wide values."""
    dynamic = qcfg.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CorruptFileError(f"{where}: 'dynamic' must be an object")
    for pattern, override in dynamic.items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            matched = re.match(raw, name) is not None
        except re.error as exc:
            raise CorruptFileError(f"{where}: dynamic pattern {pattern!r} is not a regular expression ({exc})") from None
        if not matched:
            continue
        if negative:
            raise CorruptFileError(f"{where}: dynamic pattern {pattern!r} excludes {name}, but the checkpoint holds "
                                   f"{name}.qweight")
        if not isinstance(override, dict):
            raise CorruptFileError(f"{where}: dynamic[{pattern!r}] must be an object")
        return _check_bits_group(override.get("bits", base["bits"]), override.get("group_size", base["group_size"]),
                                 f"{where}: dynamic[{pattern!r}]")
    return base["bits"], base["group_size"]


def _quantized_modules(model: nn.Module, index: dict[str, Path], path: Path) -> dict[str, str]:
    """{model module name: checkpoint prefix} for every ``*.qweight`` in the checkpoint."""
    linears = {f"{name}.weight": name for name, m in model.named_modules() if name and is_linear(m)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, str] = {}
    for key, file in index.items():
        if not key.endswith(".qweight"):
            continue
        ckpt = key[: -len(".qweight")]
        mapped = map_checkpoint_key(f"{ckpt}.weight", set(linears), prefix)
        if mapped is None:
            raise CorruptFileError(f"{file}: tensor {key} names no linear layer of the model")
        found[linears[mapped]] = ckpt
    if not found:
        raise CorruptFileError(f"{path}: config says GPTQ but no *.qweight tensor is in the checkpoint")
    return found


def _assign_buffers(module: QuantLinear, tensors: dict[str, torch.Tensor], name: str) -> None:
    for key, value in tensors.items():
        want = getattr(module, key)
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:  # an internal invariant
            raise CorruptFileError(f"{name}.{key}: converted to {tuple(value.shape)} {value.dtype}, lowbit's layout "
                                   f"is {tuple(want.shape)} {want.dtype}")
        setattr(module, key, value)
    module.reset_kernel()


def _assign_dense(model: nn.Module, name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    module = model.get_submodule(name)
    value = weight.t() if is_conv1d(module) else weight  # Conv1D stores [in, out]
    module.weight = nn.Parameter(value.to(dtype).contiguous(), requires_grad=bool(module.weight.requires_grad))
