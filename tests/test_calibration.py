"""Calibration data sources, the block finder and the layer-by-layer runner."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.calib_data import CalibConfig, calibration_batches, read_calibration_text
from lowbit.algorithms.calibrate import find_blocks
from lowbit.errors import InvalidSpecError, ModelNotFoundError, UnsupportedModelError

TEXT = "The quick brown fox jumps over the lazy dog. " * 400


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lowbit.models.resolve import builtin_dir

    return AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))


def test_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("one")
    (tmp_path / "d" / "2.md").write_text("two")
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert read_calibration_text(CalibConfig(str(tmp_path / "a.txt"))).startswith("alpha")
    assert read_calibration_text(CalibConfig(str(tmp_path / "d"))) == "one\n\ntwo"
    assert read_calibration_text(CalibConfig(str(tmp_path / "r.jsonl"), field="body")) == "x y\n\nz"
    assert len(read_calibration_text(CalibConfig())) > 50_000  # built-in corpus


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nothere"):
        read_calibration_text(CalibConfig(str(tmp_path / "nothere.txt")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidSpecError, match="empty"):
        read_calibration_text(CalibConfig(str(tmp_path / "empty.txt")))
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(InvalidSpecError, match=r"r.jsonl:2: no field 'text'"):
        read_calibration_text(CalibConfig(str(tmp_path / "r.jsonl")))
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(InvalidSpecError, match="bad.jsonl:1: invalid JSON"):
        read_calibration_text(CalibConfig(str(tmp_path / "bad.jsonl")))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InvalidSpecError, match="no .txt"):
        read_calibration_text(CalibConfig(str(tmp_path / "emptydir")))


def test_windows_are_deterministic_and_checked(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEXT)
    a = calibration_batches(tokenizer, CalibConfig(str(tmp_path / "t.txt"), samples=8, seq_len=64, seed=1))
    b = calibration_batches(tokenizer, CalibConfig(str(tmp_path / "t.txt"), samples=8, seq_len=64, seed=1))
    c = calibration_batches(tokenizer, CalibConfig(str(tmp_path / "t.txt"), samples=8, seq_len=64, seed=2))
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(InvalidSpecError, match="--calib-samples 10000 asks for more"):
        calibration_batches(tokenizer, CalibConfig(str(tmp_path / "t.txt"), samples=10000, seq_len=64))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InvalidSpecError, match="fewer than one window"):
        calibration_batches(tokenizer, CalibConfig(str(tmp_path / "short.txt"), samples=1, seq_len=64))


def test_block_finder(llama_dir: Path, gpt2_dir: Path, minilm: Path) -> None:
    assert find_blocks(lowbit.load(llama_dir))[0] == "model.layers"
    assert find_blocks(lowbit.load(gpt2_dir))[0] == "transformer.h"
    assert find_blocks(lowbit.load(minilm))[0] == "encoder.layer"
    with pytest.raises(UnsupportedModelError, match="no repeated block list"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "minilm"])
def test_calibrated_methods_quantize_every_family(method: str, family: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    src = request.getfixturevalue({"llama": "llama_dir", "gpt2": "gpt2_dir", "minilm": "minilm"}[family])
    (tmp_path / "t.txt").write_text(TEXT)
    recipe = lowbit.QuantRecipe(lowbit.QuantSpec.int_(4, 64, symmetric=False), method=method)
    result = lowbit.quantize_pretrained(src, recipe, tmp_path / "q", show_progress=False,
                                        calibration=CalibConfig(str(tmp_path / "t.txt"), samples=4, seq_len=32))
    model = lowbit.load(tmp_path / "q")
    n_linear = sum(isinstance(m, lowbit.QuantLinear) for m in model.modules())
    assert n_linear == result.layers_quantized > 0
    assert model.lowbit_method == method


def test_norm_pairs_and_stages_are_exact(llama_dir: Path) -> None:
    # ids of freed tensors get reused: pairing must not mistake down_proj's input for a norm output
    from lowbit.algorithms.calibrate import _stages, capture_block_inputs
    from lowbit.algorithms.smoothing import foldable_pairs
    from lowbit.models.targets import is_linear

    model = lowbit.load(llama_dir)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, [{"input_ids": torch.randint(0, 4096, (2, 16))}], torch.device("cpu"))
    block = blocks[0]
    for _ in range(3):
        pairs = foldable_pairs(block, lambda: block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0]))
        assert pairs == {"input_layernorm": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                         "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
    layers = {n: m for n, m in block.named_modules() if n and is_linear(m)}
    assert _stages(block, layers, inputs) == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                              ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                              ["mlp.down_proj"]]
