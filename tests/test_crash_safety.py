"""Crash safety of outputs (issue 21): atomic replacement, repair after a kill, concurrent writers, and SIGKILL
at random moments of ``lowbit quantize`` and ``lowbit export`` (``LOWBIT_KILLS`` per command: 10 in the default
suite, ``make fuzz`` runs 100)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.errors import OutputExistsError
from lowbit.io.writer import atomic_output_dir, recover_output_dir

from crash_support import ENV, kill_loop, litter

DEAD_PID = 2 ** 22 + 12345  # above the default pid_max: never a live process


def _write(out: Path, text: str, overwrite: bool = True) -> None:
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text * 2)


def test_replace_is_one_step_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _write(out, "one")
    _write(out, "two")
    assert (out / "a.txt").read_text() == "two" and (out / "sub" / "b.txt").read_text() == "twotwo"
    assert litter(out) == []
    with pytest.raises(OutputExistsError, match="already exists"):
        _write(out, "three", overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "two" and litter(out) == []


def test_next_writer_repairs_what_a_killed_one_left(tmp_path: Path) -> None:
    out = tmp_path / "model"
    # a writer killed between the two renames of the fallback path: the previous version is parked, out is gone
    parked = tmp_path / f".model.old-{DEAD_PID}-abc" / "previous"
    parked.mkdir(parents=True)
    (parked / "a.txt").write_text("previous")
    stale_tmp = tmp_path / f".model.tmp-{DEAD_PID}-xyz"
    stale_tmp.mkdir()
    (stale_tmp / "half.safetensors").write_bytes(b"\0" * 10)
    live_tmp = tmp_path / f".model.tmp-{os.getpid()}-live"  # a writer still running: left alone
    live_tmp.mkdir()
    recover_output_dir(out)
    assert (out / "a.txt").read_text() == "previous"
    assert litter(out) == [live_tmp.name]
    live_tmp.rmdir()
    (tmp_path / f".model.gguf.tmp-{DEAD_PID}-q").write_bytes(b"GGUF")  # a killed export's temporary file
    recover_output_dir(tmp_path / "model.gguf")
    assert litter(tmp_path / "model.gguf") == []


def test_the_writer_that_loses_a_race_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(OutputExistsError, match="another process"):
        with atomic_output_dir(out) as tmp:
            (tmp / "a.txt").write_text("mine")
            _write(out, "theirs", overwrite=False)  # the other process finishes first
    assert (out / "a.txt").read_text() == "theirs" and litter(out) == []
    with atomic_output_dir(out, overwrite=True) as tmp:  # with --overwrite the last one wins
        (tmp / "a.txt").write_text("mine")
        _write(out, "theirs again")
    assert (out / "a.txt").read_text() == "mine" and litter(out) == []


def test_concurrent_quantize_processes(tmp_path: Path) -> None:
    """8 processes quantizing into one directory (different outputs) and 2 writing the same output: every
    distinct output is complete; of the two on one output, one wins and the other fails with a clear message."""
    import lowbit

    def start(out: Path, bits: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lowbit", "quantize", "builtin:tiny-lm", "-o", str(out),
                                 "--bits", str(bits), "--quiet"], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = [(tmp_path / f"q{i}", start(tmp_path / f"q{i}", 4 if i % 2 else 8)) for i in range(8)]
    procs += [(tmp_path / "same", start(tmp_path / "same", bits)) for bits in (4, 8)]
    results = [(out, p.wait(timeout=900), p.stderr.read()) for out, p in procs]
    for out, code, err in results[:8]:
        assert code == 0, err[-1000:]
        lowbit.load(out)
    codes = sorted(code for _, code, _ in results[8:])
    assert codes == [0, 2], results[8:]
    loser = next(err for _, code, err in results[8:] if code == 2)
    assert "same" in loser and ("another process" in loser or "already exists" in loser) and "Traceback" not in loser
    lowbit.load(tmp_path / "same")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    print(f"concurrency: 8 quantize processes into one directory all complete and load; of 2 on one output, one "
          f"wrote it and the other exited {codes[1]}: {loser.strip().splitlines()[-1]}")


def test_sigkill_quantize(tmp_path: Path) -> None:
    out = tmp_path / "q"
    seen = kill_loop(["quantize", "builtin:tiny-lm", "-o", str(out), "--overwrite", "--quiet"], out, seed=1,
                     warm=["info", "builtin:tiny-lm"])
    print("quantize kills:", seen)


def test_sigkill_export(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    seen = kill_loop(["export", "builtin:tiny-lm", "--format", "gguf", "--type", "q8_0", "-o", str(out),
                      "--overwrite", "--quiet"], out, seed=2, warm=["info", "builtin:tiny-lm"])
    print("export kills:", seen)
