"""transformers' from_pretrained reads lowbit directories: QuantLinear layers, logits equal lowbit.load's,
adapters train over it, save_pretrained writes a directory lowbit.load reads; import order does not matter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import CorruptFileError
from lowbit.nn.quant_linear import QuantLinear

from conftest import make_tiny_llama, train_steps

IDS = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))

# (name, lowbit quantize arguments): integer, codebook with double-quantized scales, fp8, W8A8 (static act scales)
FORMATS = [
    ("int4-g32", ["--bits", "4", "--group-size", "32"]),
    ("nf4-dq", ["--format", "nf4", "--group-size", "32", "--double-quant"]),
    ("fp8", ["--format", "fp8"]),
    ("w8a8-static", ["--method", "static", "--calib-samples", "2", "--calib-seq-len", "32"]),
]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "llama", hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def int4_dir(float_dir: Path) -> Path:
    return _quantize(float_dir, float_dir.parent / "int4", FORMATS[0][1])


def _quantize(src: Path, out: Path, args: list[str]) -> Path:
    from lowbit.cli import main

    assert main(["quantize", str(src), "-o", str(out), "--quiet", "--overwrite", *args]) == 0
    return out


def _from_pretrained(path: Path, **kwargs):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name,args", FORMATS, ids=[f[0] for f in FORMATS])
def test_from_pretrained_equals_lowbit_load(name: str, args: list[str], float_dir: Path, tmp_path: Path) -> None:
    out = _quantize(float_dir, tmp_path / name, args)
    model, info = _from_pretrained(out, output_loading_info=True)
    ours = lowbit.load(out)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    quantized = {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and quantized == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    theirs, mine = model.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(theirs[k].dtype == mine[k].dtype and torch.equal(theirs[k], mine[k]) for k in mine)
    assert torch.equal(_logits(model), _logits(ours))
    assert model.is_quantized and model.lowbit_source == out


def test_save_pretrained_round_trip(int4_dir: Path, tmp_path: Path) -> None:
    model = _from_pretrained(int4_dir)
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((int4_dir / "config.json").read_text())["quantization_config"]
    expected = _logits(lowbit.load(int4_dir))
    assert torch.equal(_logits(lowbit.load(tmp_path / "saved")), expected)
    assert torch.equal(_logits(_from_pretrained(tmp_path / "saved")), expected)


def test_peft_lora_trains_over_from_pretrained(int4_dir: Path) -> None:
    import peft

    from lowbit.peft.hf import register_quant_linear

    model = _from_pretrained(int4_dir)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".qdata")}
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, register_quant_linear(peft.LoraConfig(r=4, target_modules="all-linear"), model))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    def grads_flow(params: list[torch.Tensor]) -> None:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)

    losses = train_steps(pm, IDS, lr=1e-2, steps=4, check=grads_flow)
    assert losses[-1] < losses[0]
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): b for n, b in pm.named_buffers()
             if n.endswith(".qdata")}
    assert after.keys() == packed.keys() and all(torch.equal(after[n], packed[n]) for n in packed)


def test_lowbit_lora_trains_over_from_pretrained(int4_dir: Path) -> None:
    from lowbit.peft import LoraConfig, apply_adapter

    model = _from_pretrained(int4_dir)
    torch.manual_seed(0)
    apply_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    losses = train_steps(model, IDS, lr=1e-2, steps=4)
    assert losses[-1] < losses[0]


def test_bad_quantization_config_is_a_typed_error(int4_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]["format_version"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="format_version"):
        _from_pretrained(bad)


def test_install_registers_at_once_when_the_registry_is_loaded() -> None:
    from transformers.quantizers import auto

    from lowbit.io import hf_integration
    from lowbit.io.hf_integration import install, register

    auto.AUTO_QUANTIZER_MAPPING.pop("lowbit")
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("lowbit")
    try:
        install()
        assert auto.AUTO_QUANTIZER_MAPPING["lowbit"] is hf_integration.LowbitHfQuantizer
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is hf_integration.LowbitConfig
    finally:
        assert register() and register()  # idempotent; restores the registration if install() failed


_ORDERS = {
    # lowbit first: it does not import transformers; a sys.meta_path hook registers when transformers'
    # quantizer registry is imported
    "lowbit-first": """
        import lowbit
        assert "transformers" not in sys.modules, "import lowbit imported transformers"
        from transformers import AutoModelForCausalLM
    """,
    # transformers imported, its quantizer registry not yet (the hook again, installed later)
    "transformers-first": """
        from transformers import AutoModelForCausalLM
        import lowbit
    """,
}


@pytest.mark.parametrize("order", list(_ORDERS))
def test_import_order_does_not_matter(order: str, int4_dir: Path) -> None:
    script = "import sys\n" + textwrap.dedent(_ORDERS[order]) + textwrap.dedent(f"""
        from lowbit.nn.quant_linear import QuantLinear
        model = AutoModelForCausalLM.from_pretrained({str(int4_dir)!r})
        assert any(isinstance(m, QuantLinear) for m in model.modules())
        print("ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
