"""--max-memory: sizes parse, over-budget work is refused before it starts or stopped mid-way, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lowbit
from lowbit import memory
from lowbit.algorithms.calib_data import CalibConfig
from lowbit.cli import main
from lowbit.errors import InvalidSpecError, MemoryBudgetError
from lowbit.io.streaming import quantize_pretrained


@pytest.mark.parametrize("text,expected", [("1.5GB", 1_500_000_000), ("800MB", 800_000_000), ("2GiB", 2 << 30),
                                           ("512mib", 512 << 20), ("12345", 12345), (4096, 4096)])
def test_parse_size(text: str | int, expected: int) -> None:
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "-1GB", "0", "GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidSpecError):
        memory.parse_size(text)


def test_current_rss_is_plausible() -> None:
    assert 10 << 20 < memory.current_rss() < 64 << 30


def test_cli_refuses_gptq_over_the_cap_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    rc = main(["quantize", "builtin:tiny-lm", "--method", "gptq", "--calib-samples", "4", "--max-memory", "100MB",
               "-o", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "calibration needs about" in err
    assert not out.exists()


def test_gptq_stops_when_rss_passes_the_cap_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "q"
    limit = 10 << 30
    readings = iter([0] * 3 + [limit + 1] * 1000)  # fits at first, then the resident size passes the cap
    monkeypatch.setattr(memory, "current_rss", lambda: next(readings))
    recipe = lowbit.QuantRecipe(lowbit.QuantSpec.int_(4, 128), method="gptq")
    with memory.memory_budget(limit), pytest.raises(MemoryBudgetError, match="after block"):
        quantize_pretrained("builtin:tiny-lm", recipe, out, show_progress=False,
                            calibration=CalibConfig(samples=4, seq_len=64))
    # the temporary output was removed; what is left is the resume state of the blocks that finished …
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".q.resume"]
    assert json.loads((tmp_path / ".q.resume" / "state.json").read_text())["blocks"]
    monkeypatch.setattr(memory, "current_rss", lambda: 0)
    quantize_pretrained("builtin:tiny-lm", recipe, out, show_progress=False,  # … which a rerun continues from
                        calibration=CalibConfig(samples=4, seq_len=64))
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["q"]


def test_streaming_rtn_checks_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "current_rss", lambda: 2 << 30)
    with memory.memory_budget("1GB"), pytest.raises(MemoryBudgetError, match="before reading"):
        quantize_pretrained("builtin:tiny-lm", lowbit.QuantSpec.int_(4, 128), tmp_path / "q", show_progress=False)
    assert not (tmp_path / "q").exists()


def test_no_budget_means_no_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "current_rss", lambda: 1 << 50)
    memory.check_budget("anywhere")
    memory.require(1 << 50, "anything")
