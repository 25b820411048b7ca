"""Hand-edited or corrupt config.json values: one typed error naming the file and the field, before any model is
built (issue 21: a negative hidden_size, a list where an integer belongs or a 2^40 dimension used to end in a
traceback from transformers, one of them an attempted petabyte allocation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lowbit
from lowbit.cli import main
from lowbit.errors import CorruptFileError, UnsupportedModelError
from lowbit.models.config_check import check_config

BAD_VALUES = [
    ("hidden_size", -128, "outside"), ("hidden_size", [128], "must be an integer"), ("hidden_size", 1 << 40, "outside"),
    ("hidden_size", 128.5, "must be an integer"), ("hidden_size", True, "must be an integer"),
    ("vocab_size", 0, "outside"), ("vocab_size", "4096", "must be an integer"),
    ("num_hidden_layers", 1 << 20, "outside"), ("num_attention_heads", 3, "multiple"),
    ("num_key_value_heads", 3, "multiple"), ("intermediate_size", {"a": 1}, "must be an integer"),
    ("max_position_embeddings", 1 << 40, "outside"), ("rms_norm_eps", -1.0, "finite number"),
    ("rope_theta", "inf", "finite number"), ("eos_token_id", "</s>", "token id"), ("bos_token_id", 1 << 40, "token id"),
    ("head_dim", 0, "outside"), ("architectures", "LlamaForCausalLM", "list of class names"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_VALUES])
def test_bad_value_is_named(llama_dir: Path, tmp_path: Path, field: str, value: object, message: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match=rf"config.json: .*{field}.*{message}|config.json: .*{message}"):
        lowbit.load(bad)


def test_the_cli_prints_one_line_and_exits_2(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = -5
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size = -5" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_values_transformers_itself_rejects_are_typed_too(llama_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "no-such-scaling", "factor": "x"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises((CorruptFileError, UnsupportedModelError), match="config.json"):
        lowbit.load(bad)


def test_real_configs_pass(llama_dir: Path) -> None:
    from lowbit.models.resolve import builtin_dir

    for path in (llama_dir / "config.json", builtin_dir("tiny-lm") / "config.json"):
        check_config(json.loads(path.read_text()), str(path))
    check_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "eos_token_id": [1, 2],
                  "sliding_window": None})


def test_a_huge_value_is_quoted_short(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 1 MB string where a name belongs: the error names the file and field and stays short (found fuzzing)."""
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "x" * 2**20
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        lowbit.load(bad)
    text = str(info.value)
    assert len(text) < 2100 and "characters left out" in text and "model_type" in text[:1500], text[:300]
    assert main(["eval", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 2200 and err.count("\n") == 1
