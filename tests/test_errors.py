"""Bad input: typed errors naming the file/field/layer, exit code 2 from the CLI, nothing half-written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.cli import main
from lowbit.errors import (CorruptFileError, InvalidSpecError, InvalidWeightError, ModelNotFoundError,
                           OutputExistsError, ShapeError, UnsupportedModelError)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "temporary output left behind"


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        lowbit.load(tmp_path / "nowhere")
    code, err = _cli(["quantize", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "nowhere: no such file or directory" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_builtin() -> None:
    with pytest.raises(ModelNotFoundError, match="builtin:tiny-lm"):
        lowbit.load("builtin:huge-lm")


def test_truncated_safetensors(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _copy(llama_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="model.safetensors: not a valid safetensors file"):
        lowbit.load(bad)
    out = tmp_path / "out"
    code, err = _cli(["quantize", str(bad), "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "truncated or corrupt" in err
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_garbage_safetensors_and_bad_json(llama_dir: Path, tmp_path: Path) -> None:
    bad = _copy(llama_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        lowbit.load(bad)
    bad2 = _copy(llama_dir, tmp_path / "bad2")
    (bad2 / "config.json").write_text("{ not json")
    with pytest.raises(CorruptFileError, match="config.json: invalid JSON"):
        lowbit.load(bad2)


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    bad = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CorruptFileError, match="model.layers.1.mlp.up_proj.weight"):
        lowbit.load(bad)


def test_pickle_only_directory_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    bad = _copy(llama_dir, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        lowbit.load(bad)


def test_nan_weight_names_the_layer(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(InvalidWeightError, match="model.layers.1.mlp.up_proj: weight contains NaN"):
        lowbit.quantize_pretrained(bad, lowbit.QuantSpec.int_(4, 64), tmp_path / "o", show_progress=False)
    code, err = _cli(["quantize", str(bad), "-o", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "model.layers.1.mlp.up_proj" in err
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_output_exists(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        lowbit.quantize_pretrained(llama_dir, lowbit.QuantSpec.int_(4, 64), out, show_progress=False)
    code, err = _cli(["quantize", str(llama_dir), "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "precious"  # nothing lost
    assert main(["quantize", str(llama_dir), "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["--bits", "9"], "bits=9 is out of range"),
    (["--bits", "1"], "bits=1 is out of range"),
    (["--group-size", "100"], "group_size 100 does not divide"),
    (["--format", "nf4", "--bits", "8"], "--bits 8 does not apply"),
    (["--layer-bits", "down_proj"], "PATTERN=BITS"),
])
def test_bad_options(argv: list[str], message: str, llama_dir: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture) -> None:
    code, err = _cli(["quantize", str(llama_dir), "-o", str(tmp_path / "o"), "--quiet", *argv], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--method", "magic"], ["--format", "int7"]])
def test_unknown_method_or_format(argv: list[str], llama_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(llama_dir), "-o", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_unknown_method_in_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"method": "magic", "default": {"bits": 4}}))
    with pytest.raises(InvalidSpecError, match="unknown method 'magic'"):
        lowbit.QuantRecipe.load(recipe)
    recipe.write_text(json.dumps({"default": {"bits": 4}, "colour": "red"}))
    with pytest.raises(InvalidSpecError, match="unknown key"):
        lowbit.QuantRecipe.load(recipe)


def test_group_size_error_names_layer_before_any_output(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match=r"model\.layers\.0\..*group_size 96"):
        lowbit.quantize_pretrained(llama_dir, lowbit.QuantSpec.int_(4, 96), tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_cli_user_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", str(tmp_path / "missing"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing" in proc.stderr


def test_eval_ppl_on_encoder_is_a_clear_error(minilm: Path, capsys: pytest.CaptureFixture, eval_text: Path) -> None:
    code, err = _cli(["eval", str(minilm), "--ppl", str(eval_text), "--quiet"], capsys)
    assert code == 2 and "causal language model" in err


def test_inf_weight_rejected_with_name() -> None:
    with pytest.raises(InvalidWeightError, match="lin"):
        lowbit.quantize_tensor(torch.tensor([[1.0, float("inf")]]), lowbit.QuantSpec.int_(8, None), name="lin")
