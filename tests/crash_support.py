"""SIGKILL a lowbit command at random moments and check what it leaves (issue 21, crash safety).

``kill_loop`` runs the command once to completion (the reference output and its duration T), then ``kills`` times
starts it again and SIGKILLs its process group: after a random delay in [0.3 s, 1.1·T], or (every other kill)
within 50 ms of its temporary output appearing, so that the write itself is interrupted. After every kill the output
must be absent or complete — equal, file for file, to the reference (the commands are deterministic) — and after
the loop one more run must succeed and leave no temporary litter next to the output.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

KILLS = int(os.environ.get("LOWBIT_KILLS", "4"))  # per command; `make fuzz` runs 100
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def digest(path: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """{relative file: sha256} of a file or of every file under a directory."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not skip(p)}


def litter(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def kill_loop(argv: list[str], out: Path, *, kills: int = KILLS, seed: int = 0,
              rerun_argv: list[str] | None = None, check: Callable[[Path], None] | None = None,
              skip: Callable[[Path], bool] = lambda p: False) -> dict[str, int]:
    """Returns counts: kills, absent / complete outputs seen after a kill, litter entries cleaned up."""
    start = time.perf_counter()
    first = run(argv)
    duration = time.perf_counter() - start
    assert first.returncode == 0, first.stderr[-2000:]
    reference = digest(out, skip)
    rng = random.Random(seed)
    seen = {"kills": 0, "absent": 0, "complete": 0, "litter_after_kill": 0}
    for i in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "lowbit", *(rerun_argv or argv)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if i % 2:  # every other kill lands while the output is being written: wait for its temporary, then kill
            deadline = time.perf_counter() + 2 * duration
            while not litter(out) and proc.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            time.sleep(rng.uniform(0.3, 1.1 * duration))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        seen["kills"] += 1
        seen["litter_after_kill"] += len(litter(out))
        if not out.exists():
            seen["absent"] += 1
            continue
        got = digest(out, skip)
        assert got == reference, f"after a kill {out} is neither absent nor the complete output: " \
                                 f"{sorted(set(got) ^ set(reference)) or 'contents differ'}"
        if check is not None:
            check(out)
        seen["complete"] += 1
    final = run(rerun_argv or argv)
    assert final.returncode == 0, final.stderr[-2000:]
    assert digest(out, skip) == reference
    assert litter(out) == [], f"temporary litter left next to {out}: {litter(out)}"
    return seen
