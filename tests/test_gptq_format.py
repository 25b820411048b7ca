"""GPTQ checkpoint format, both ways: identical logits after export → load, the packed layout checked
against an independent pure-Python packer, act-order files, refusals and corrupt files."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit import QuantLinear, QuantSpec
from lowbit.errors import CorruptFileError, ExportError, OutputExistsError, UnsupportedModelError
from lowbit.formats.packing import unpack
from lowbit.io.gptq_format import decode_qzeros, export_gptq, is_gptq_dir, load_gptq, pack_words, unpack_words
from lowbit.recipe import LayerOverride, QuantRecipe

IDS = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
LAYER = "model.layers.0.self_attn.k_proj"  # in 128 → out 64


# ---- an independent reference: AutoGPTQ's packing loops and a big-integer bit-stream reader -------
def ref_pack(values: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's pack loops: values [L][M] (packed along L) → signed int32 words [L·bits/32][M]."""
    rows, cols = len(values) * bits // 32, len(values[0])
    out = [[0] * cols for _ in range(rows)]
    for c in range(cols):
        i = row = 0
        while row < rows:
            if bits in (2, 4, 8):
                for j in range(32 // bits):
                    out[row][c] |= values[i + j][c] << (bits * j)
                i += 32 // bits
                row += 1
                continue
            for j in range(10):  # 3 bits: 10 | 1 straddling | 10 | 1 straddling | 10 per three words
                out[row][c] |= values[i + j][c] << (3 * j)
            i += 10
            out[row][c] |= (values[i][c] << 30) & 0xFFFFFFFF
            row += 1
            out[row][c] |= (values[i][c] >> 2) & 1
            i += 1
            for j in range(10):
                out[row][c] |= values[i + j][c] << (3 * j + 1)
            i += 10
            out[row][c] |= (values[i][c] << 31) & 0xFFFFFFFF
            row += 1
            out[row][c] |= (values[i][c] >> 1) & 3
            i += 1
            for j in range(10):
                out[row][c] |= values[i + j][c] << (3 * j + 2)
            i += 10
            row += 1
    return [[w - (1 << 32) if w >= 1 << 31 else w for w in r] for r in out]


def ref_unpack(words: torch.Tensor, bits: int) -> list[list[int]]:
    """int32 [W, M] → codes [W·32/bits][M]: column c is one little-endian bit stream."""
    rows, cols = words.shape
    out = [[0] * cols for _ in range(rows * 32 // bits)]
    for c in range(cols):
        stream = sum((int(words[r, c]) & 0xFFFFFFFF) << (32 * r) for r in range(rows))
        for i in range(rows * 32 // bits):
            out[i][c] = (stream >> (bits * i)) & ((1 << bits) - 1)
    return out


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def quantized(src: Path, spec_or_recipe) -> nn.Module:
    return lowbit.quantize(lowbit.load(src), spec_or_recipe)


@pytest.fixture(scope="module")
def exported(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = quantized(llama_dir, QuantSpec.int_(4, 32, symmetric=False))
    return model, export_gptq(model, tmp_path_factory.mktemp("gptq") / "int4-g32-asym")


# ---- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_words_is_autogptqs_layout(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (64, 5), generator=g, dtype=torch.uint8)  # [K, N]
    words = pack_words(codes.t(), bits).t()  # packed along K: [K·b/32, N]
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert words.tolist() == ref_pack(codes.tolist(), bits)
    assert ref_unpack(words, bits) == codes.tolist()
    assert torch.equal(unpack_words(words.t(), bits, 64), codes.t())


def test_v1_zero_points_read_as_gptqmodel_does() -> None:
    fields = torch.tensor([[7, 14, 0, 3, 15, 2, 9, 4]], dtype=torch.uint8)  # 4-bit fields, low first
    words = pack_words(fields, 4)
    assert decode_qzeros(words, 4, 8, "gptq_v2").tolist() == fields.tolist()
    # v1: the whole word gets +0x11111111; the 15 (a borrowed "−1") wraps to 0 and carries into the next
    assert decode_qzeros(words, 4, 8, "gptq").tolist() == [[8, 15, 1, 4, 0, 4, 10, 5]]
    three = pack_words(torch.tensor([[7] + [1] * 31], dtype=torch.uint8), 3)
    assert decode_qzeros(three, 3, 32, "gptq").tolist() == [[0] + [2] * 31]  # 3 bits: per field, modulo 8


# ---- export → load -----------------------------------------------------------------------------
SPECS = [QuantSpec.int_(4, 32, symmetric=False), QuantSpec.int_(4, 64), QuantSpec.int_(8, None),
         QuantSpec.int_(8, 32, symmetric=False), QuantSpec.int_(3, 32, symmetric=False), QuantSpec.int_(3, 64),
         QuantSpec.int_(2, 32, symmetric=False), QuantSpec.int_(2, None)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_roundtrip_gives_identical_logits(spec: QuantSpec, llama_dir: Path, tmp_path: Path) -> None:
    model = quantized(llama_dir, spec)
    out = export_gptq(model, tmp_path / "g")
    assert is_gptq_dir(out)
    loaded = load_gptq(out)
    assert {n: m.spec for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == \
           {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lowbit_method == "gptq"

    # the stored layout, checked against the independent reference
    tensors = load_file(str(out / "model.safetensors"))
    qw = model.get_submodule(LAYER).weight
    bits, (n, k) = spec.bits, qw.shape
    groups = 1 if spec.group_size is None else k // spec.group_size
    codes = unpack(qw.tensors["qdata"], bits, k)  # [N, K] unsigned (symmetric: offset 2^(b−1))
    zeros = qw.zero_point.round().long() + (1 << (bits - 1) if spec.symmetric else 0)  # [N, G]
    assert tensors[f"{LAYER}.qweight"].tolist() == ref_pack(codes.t().tolist(), bits)
    ref_zeros = torch.tensor(ref_pack((zeros - 1).tolist(), bits)).t()  # v1: Z − 1, packed along N
    assert tensors[f"{LAYER}.qzeros"].tolist() == ref_zeros.tolist()
    assert tensors[f"{LAYER}.qzeros"].shape == (groups, n * bits // 32)
    assert tensors[f"{LAYER}.scales"].dtype == torch.float16 and tensors[f"{LAYER}.scales"].shape == (groups, n)
    assert torch.equal(tensors[f"{LAYER}.g_idx"], (torch.arange(k) // (k // groups)).int())
    # …and its meaning: W = scales[g_idx] · (q − (stored zero + 1))
    q = torch.tensor(ref_unpack(tensors[f"{LAYER}.qweight"], bits)).float()  # [K, N]
    z = torch.tensor(ref_unpack(tensors[f"{LAYER}.qzeros"].t(), bits)).t().float() + 1  # [G, N]
    g_idx = tensors[f"{LAYER}.g_idx"].long()
    w = (q - z[g_idx]) * tensors[f"{LAYER}.scales"].float()[g_idx]
    assert torch.equal(w.t(), qw.dequantize())


def test_config_and_files(exported: tuple[nn.Module, Path]) -> None:
    _, out = exported
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq" and qcfg["format"] == "gptq"
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (4, 32, False, False)
    assert qcfg["true_sequential"] is True and qcfg["static_groups"] is False and qcfg["lm_head"] is False
    assert 0 < qcfg["damp_percent"] < 1 and qcfg["pack_dtype"] == "int32"
    assert qcfg["lowbit"]["method"] == "rtn" and qcfg["lowbit"]["specs"] == {"int4-g32-asym": 14}
    assert "dynamic" not in qcfg and "modules_in_block_to_quantize" not in qcfg
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(key.endswith((".qdata", ".scale", ".zero")) for key in tensors)
    assert tensors[f"{LAYER}.qweight"].dtype == tensors[f"{LAYER}.qzeros"].dtype == torch.int32
    assert tensors["lm_head.weight"].dtype == torch.float32


def test_gptq_method_and_v2(llama_dir: Path, tmp_path: Path) -> None:
    from lowbit.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
    from lowbit.models.targets import set_submodule

    model = lowbit.load(llama_dir)
    g = torch.Generator().manual_seed(1)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        acc = HessianAccumulator(layer.in_features)
        acc.add_batch(torch.randn(64, layer.in_features, generator=g))
        qw = gptq_quantize(layer.weight.detach(), acc.hessian, QuantSpec.int_(4, 32, symmetric=False),
                           GPTQConfig(act_order=True, block_size=32))
        set_submodule(model, name, QuantLinear.from_weight(qw, layer.bias))
    model.lowbit_method = "gptq"
    out = export_gptq(model, tmp_path / "v2", checkpoint_format="gptq_v2")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["lowbit"]["method"] == "gptq"
    assert torch.equal(logits(load_gptq(out)), logits(model))


def test_tied_and_quantized_head(tied_llama_dir: Path, tmp_path: Path) -> None:
    model = quantized(tied_llama_dir, QuantSpec.int_(4, 64))
    out = export_gptq(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert torch.equal(logits(load_gptq(out)), logits(model))

    recipe = QuantRecipe(QuantSpec.int_(4, 64), overrides=(LayerOverride("lm_head", QuantSpec.int_(4, 64)),))
    model = quantized(tied_llama_dir, recipe)
    out = export_gptq(model, tmp_path / "head")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is True
    loaded = load_gptq(out)
    assert isinstance(loaded.lm_head, QuantLinear) and torch.equal(logits(loaded), logits(model))


def test_float_layers_in_blocks_are_named(llama_dir: Path, tmp_path: Path) -> None:
    model = quantized(llama_dir, QuantRecipe(QuantSpec.int_(4, 32), skip=("lm_head", "down_proj")))
    out = export_gptq(model, tmp_path / "partial")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "mlp.down_proj" not in qcfg["modules_in_block_to_quantize"][0]
    assert len(qcfg["modules_in_block_to_quantize"][0]) == 6
    assert list(qcfg["dynamic"]) == [r"-:^model\.layers\.0\.mlp\.down_proj$", r"-:^model\.layers\.1\.mlp\.down_proj$"]
    loaded = load_gptq(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, nn.Linear)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("spec, exact", [(QuantSpec.int_(4, 32, symmetric=False, scale_dtype="bfloat16"), True),
                                         (QuantSpec.int_(4, 32, scale_dtype="float32"), False),
                                         (QuantSpec.int_(4, 32, double_quant=True), False)],
                         ids=["bf16", "fp32", "double-quant"])
def test_non_fp16_scales_are_converted(spec: QuantSpec, exact: bool, llama_dir: Path, tmp_path: Path) -> None:
    model = quantized(llama_dir, spec)
    with pytest.warns(UserWarning, match=r"scales of 14 layer\(s\) converted to float16"):
        out = export_gptq(model, tmp_path / "g")
    report = json.loads((out / "config.json").read_text())["quantization_config"]["lowbit"]["scale_conversion"]
    assert report["layers"] == 14
    loaded = load_gptq(out)
    want, got = model.get_submodule(LAYER), loaded.get_submodule(LAYER)
    assert got.spec == spec.replace(scale_dtype="float16", double_quant=False)
    assert torch.equal(got.qdata, want.qdata)  # codes unchanged
    err = (got.weight.dequantize() - want.weight.dequantize()).abs().max().item()
    assert err <= report["max_abs_dequant_error"] < 1e-4
    assert (report["max_abs_dequant_error"] == 0) == exact  # bf16 scales are exact in float16
    assert torch.allclose(logits(loaded), logits(model), atol=1e-3)


def test_zero_point_zero_in_v1(llama_dir: Path, tmp_path: Path) -> None:
    from lowbit.tensor import QuantizedWeight

    model = lowbit.quantize(lowbit.load(llama_dir), QuantSpec.int_(4, 32, symmetric=False))
    float_layer = lowbit.load(llama_dir).get_submodule(LAYER)
    w = float_layer.weight.detach().clone()
    w[0, :32] = w[0, :32].abs()  # an all-positive group: zero-point 0
    spec = QuantSpec.int_(4, 32, symmetric=False)
    rtn = QuantizedWeight.from_float(w, spec)
    assert rtn.zero_point[0, 0] == 0
    model.model.layers[0].self_attn.k_proj = QuantLinear.from_weight(rtn)
    with pytest.raises(ExportError, match=f"{LAYER}: 1 group.*zero-point 0.*gptq_v2"):
        export_gptq(model, tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    out = export_gptq(model, tmp_path / "v2", checkpoint_format="gptq_v2")
    assert torch.equal(logits(load_gptq(out)), logits(model))
    # a zero-0 group whose top code is unused is shifted up by one: same values, valid v1
    scale, zero = rtn.scale.clone(), rtn.zero_point.clone()
    scale[0, 0] *= 1.5
    model.model.layers[0].self_attn.k_proj = QuantLinear.from_weight(QuantizedWeight.from_qparams(w, spec, scale, zero))
    out = export_gptq(model, tmp_path / "shifted")
    assert torch.equal(logits(load_gptq(out)), logits(model))


# ---- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    (QuantSpec.nf4(64), "not an integer format"),
    (QuantSpec.fp8(), "not an integer format"),
    (QuantSpec.int_(4, 32, symmetric=False, zero_dtype="float16"), "real-valued"),
    (QuantSpec.int_(5, 32), "5-bit"),
    (QuantSpec.int_(6, None), "6-bit"),
    (QuantSpec.int_(4, -1), "per-tensor"),
], ids=["nf4", "fp8", "hqq-float-zero", "int5", "int6", "per-tensor"])
def test_refusals_name_the_layer(spec: QuantSpec, match: str, llama_dir: Path, tmp_path: Path) -> None:
    model = quantized(llama_dir, spec)
    with pytest.raises(ExportError, match=rf"model\.layers\.0\.self_attn\.q_proj: .*{match}"):
        export_gptq(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_refuses_mixed_layouts_and_uneven_float_layers(llama_dir: Path, tmp_path: Path) -> None:
    mixed = QuantRecipe(QuantSpec.int_(4, 32), overrides=(LayerOverride("down_proj", QuantSpec.int_(8, 32)),))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.down_proj: 8 bits, group size 32 differs"):
        export_gptq(quantized(llama_dir, mixed), tmp_path / "x")
    uneven = QuantRecipe(QuantSpec.int_(4, 32), skip=("lm_head", r"model\.layers\.1\.mlp\.down_proj"))
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.down_proj: stays float"):
        export_gptq(quantized(llama_dir, uneven), tmp_path / "x")
    with pytest.raises(ExportError, match="no quantized layers"):
        export_gptq(lowbit.load(llama_dir), tmp_path / "x")
    # sym and asym layers mix fine: every layer's zero-points are stored
    mix_sym = QuantRecipe(QuantSpec.int_(4, 32), overrides=(LayerOverride("down_proj", QuantSpec.int_(4, 32, symmetric=False)),))
    model = quantized(llama_dir, mix_sym)
    out = export_gptq(model, tmp_path / "mix")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False
    assert torch.equal(logits(load_gptq(out)), logits(model))
    with pytest.raises(OutputExistsError):
        export_gptq(model, out)


# ---- act-order files ---------------------------------------------------------------------------
def test_act_order_file_loads_as_exact_float(exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, src = exported
    out = tmp_path / "act-order"
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    name, (k, n, group) = "model.layers.0.mlp.down_proj", (256, 128, 32)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 16, (k // group, n), generator=g)  # real zero-points a v1 file can hold
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)]
    tensors[f"{name}.qweight"] = torch.tensor(ref_pack(codes.tolist(), 4), dtype=torch.int32)
    tensors[f"{name}.qzeros"] = torch.tensor(ref_pack((zeros - 1).t().tolist(), 4), dtype=torch.int32).t().contiguous()
    tensors[f"{name}.scales"] = scales
    tensors[f"{name}.g_idx"] = g_idx.int()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (out / "config.json").write_text(json.dumps(config))

    with pytest.warns(UserWarning, match=r"1 act-order layer\(s\)"):
        loaded = load_gptq(out)
    reference_w = ((codes - zeros[g_idx]).float() * scales.float()[g_idx]).t()  # [N, K]
    layer = loaded.get_submodule(name)
    assert type(layer) is nn.Linear and torch.equal(layer.weight, reference_w)
    reference = load_gptq(src)
    reference.model.layers[0].mlp.down_proj = nn.Linear(k, n, bias=False)
    reference.model.layers[0].mlp.down_proj.weight = nn.Parameter(reference_w)
    assert torch.equal(logits(loaded), logits(reference))
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 13


# ---- corrupt and unsupported files -------------------------------------------------------------
def _edit(src: Path, dest: Path, tensors=None, qcfg=None) -> Path:
    shutil.copytree(src, dest)
    if tensors is not None:
        state = load_file(str(dest / "model.safetensors"))
        tensors(state)
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if qcfg is not None:
        config = json.loads((dest / "config.json").read_text())
        qcfg(config["quantization_config"])
        (dest / "config.json").write_text(json.dumps(config))
    return dest


KEY = f"{LAYER}.qweight"


@pytest.mark.parametrize("tensors, qcfg, error, match", [
    (lambda s: s.update({KEY: s[KEY][:-1]}), None, CorruptFileError, rf"tensor {KEY}: shape \(15, 64\), expected \(16, 64\)"),
    (lambda s: s.update({KEY: s[KEY].float()}), None, CorruptFileError, rf"tensor {KEY}: dtype torch.float32"),
    (lambda s: s.update({f"{LAYER}.qzeros": s[f"{LAYER}.qzeros"].long()}), None, CorruptFileError, "qzeros: dtype torch.int64"),
    (lambda s: s[f"{LAYER}.g_idx"].__setitem__(0, 4), None, CorruptFileError, r"g_idx: values must lie in \[0, 4\)"),
    (lambda s: s.pop(f"{LAYER}.scales"), None, CorruptFileError, "no companion tensor scales"),
    (lambda s: s.update({"model.layers.0.nothing.qweight": s[KEY].clone()}), None, CorruptFileError, "names no linear layer"),
    (lambda s: s.pop("model.norm.weight"), None, CorruptFileError, "lacks 1 tensor"),
    (None, lambda q: q.update(bits=5), UnsupportedModelError, "5-bit GPTQ"),
    (None, lambda q: q.update(bits="4"), CorruptFileError, "'bits' must be an integer"),
    (None, lambda q: q.update(group_size=0), CorruptFileError, "'group_size' must be"),
    (None, lambda q: q.update(group_size=64), CorruptFileError, r"qzeros: shape \(\d+, \d+\), expected"),
    (None, lambda q: q.update(checkpoint_format="marlin", format="marlin"), UnsupportedModelError, "marlin"),
    (None, lambda q: q.update(checkpoint_format="gptq_v2"), CorruptFileError, "disagree"),
    (None, lambda q: q.update(pack_dtype="int16"), UnsupportedModelError, "pack_dtype"),
    (None, lambda q: q.update(dynamic={r"-:.*k_proj": {}}), CorruptFileError, "excludes"),
], ids=["qweight-shape", "qweight-dtype", "qzeros-dtype", "g_idx-range", "missing-scales", "stray-qweight",
        "missing-float", "bits5", "bits-str", "group0", "group-mismatch", "marlin", "format-conflict", "int16",
        "dynamic-excludes"])
def test_corrupt_files(tensors, qcfg, error, match, exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    bad = _edit(exported[1], tmp_path / "bad", tensors, qcfg)
    with pytest.raises(error, match=match):
        load_gptq(bad)


def test_dynamic_overrides_and_detection(exported: tuple[nn.Module, Path], llama_dir: Path, tmp_path: Path) -> None:
    model, src = exported
    # a GPTQModel ``dynamic`` rule giving one module its own bits: here, the layout it already has
    ok = _edit(src, tmp_path / "dyn", qcfg=lambda q: q.update(bits=8, dynamic={r"+:.*": {"bits": 4}}))
    assert torch.equal(logits(load_gptq(ok)), logits(model))
    assert is_gptq_dir(src) and not is_gptq_dir(llama_dir) and not is_gptq_dir(tmp_path / "missing")
    awq = _edit(src, tmp_path / "awq", qcfg=lambda q: q.update(quant_method="awq"))
    assert not is_gptq_dir(awq)
    with pytest.raises(UnsupportedModelError, match="'awq' is not 'gptq'"):
        load_gptq(awq)
    # AutoGPTQ's older layout: the config in quantize_config.json beside a plain config.json
    legacy = _edit(src, tmp_path / "legacy")
    (legacy / "quantize_config.json").unlink()
    assert is_gptq_dir(legacy)
    config = json.loads((legacy / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    (legacy / "config.json").write_text(json.dumps(config))
    (legacy / "quantize_config.json").write_text(json.dumps({k: qcfg[k] for k in ("bits", "group_size", "sym", "desc_act")}))
    assert is_gptq_dir(legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(logits(load_gptq(legacy)), logits(model))
