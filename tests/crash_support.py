"""SIGKILL a lowbit command at random moments and check what it leaves (issue 21, crash safety).

``kill_loop`` runs the command once to completion in a fresh ``python -m lowbit`` process (the reference output),
then ``kills`` times starts it again and SIGKILLs its process group: after a random delay in [0, 1.1·T], or (every
other kill) within 50 ms of its temporary output appearing, so that the write itself is interrupted. After every
kill the output must be absent or complete — equal, file for file, to the reference (the commands are
deterministic) — and after the loop one more fresh process must succeed and leave no temporary litter next to the
output.

The killed runs are forked from a ``Forker``: one process that imported torch, transformers and lowbit once, so a
kill costs the command's own work, not the 2–3 s of imports a fresh interpreter spends before it touches a file
(which is what lets the default suite afford 10 kills per command). Each child is the CLI's ``main`` in a new
session, exactly what ``lowbit …`` runs after its imports; a forked run to completion must give the reference
output too.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

KILLS = int(os.environ.get("LOWBIT_KILLS", "10"))  # per command; `make fuzz` runs 100
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


class Forker:
    """A server process that imports lowbit and ``preload`` once (and runs ``warm`` in-process, to import what
    that command needs), then forks one child per ``start``: the child calls ``setsid`` and ``lowbit.cli.main(argv)`` with its
    output on /dev/null. Children stay unreaped until ``wait``, so a pid (= process group) is never reused while
    the test may still signal it."""

    def __init__(self, warm: Sequence[str] | None = None,
                 preload: Sequence[str] = ("transformers.models.llama.modeling_llama",)) -> None:
        here = str(Path(__file__).resolve().parent)
        env = {**ENV, "PYTHONPATH": os.pathsep.join([here, ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen([sys.executable, "-c", "import crash_support; crash_support._serve()"],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._ask(["warm", [list(warm or []), list(preload)]])
        assert ready == "ready", f"the fork server did not start: {ready!r}"

    def _ask(self, request: list) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait(timeout=10)})")
        return reply

    def start(self, argv: Sequence[str]) -> int:
        return int(self._ask(["run", list(argv)]))

    @staticmethod
    def running(pid: int) -> bool:
        """False once the child has exited (a zombie, 'Z', until ``wait`` reaps it)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    def wait(self, pid: int) -> int:
        """The child's exit code (-9 after a SIGKILL)."""
        return int(self._ask(["wait", pid]))

    def kill(self, pid: int) -> int:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Forker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    """The fork server's loop: JSON requests on stdin, one reply line each on stdout."""
    import torch  # noqa: F401  (what every command imports first)

    import lowbit.cli

    reply = sys.stdout
    null = os.open(os.devnull, os.O_RDWR)
    for line in sys.stdin:
        kind, arg = json.loads(line)
        if kind == "warm":
            arg, modules = arg
            for module in modules:  # what building the model imports (transformers' lazy modules: seconds)
                importlib.import_module(module)
            if arg:
                saved = os.dup(1), os.dup(2)
                os.dup2(null, 1), os.dup2(null, 2)
                try:
                    lowbit.cli.main(arg)
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            print("ready", file=reply, flush=True)
        elif kind == "run":
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: a new session (its own process group), quiet, then the command
                code = 1
                try:
                    os.setsid()
                    for fd in (0, 1, 2):
                        os.dup2(null, fd)
                    code = lowbit.cli.main(arg)
                    import atexit

                    atexit._run_exitfuncs()  # what a normal interpreter exit runs
                    sys.stdout.flush(), sys.stderr.flush()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001  (a traceback would go to /dev/null: report it as exit 1)
                    code = 1
                finally:
                    os._exit(code)
            print(pid, file=reply, flush=True)
        elif kind == "wait":
            _, status = os.waitpid(arg, 0)
            print(os.waitstatus_to_exitcode(status), file=reply, flush=True)


def kill_loop(argv: list[str], out: Path, *, kills: int = KILLS, seed: int = 0,
              rerun_argv: list[str] | None = None, check: Callable[[Path], None] | None = None,
              skip: Callable[[Path], bool] = lambda p: False, warm: Sequence[str] | None = None) -> dict[str, int]:
    """Returns counts: kills, absent / complete outputs seen after a kill, litter entries cleaned up."""
    first = run(argv)
    assert first.returncode == 0, first.stderr[-2000:]
    reference = digest(out, skip)
    again = rerun_argv or argv
    rng = random.Random(seed)
    seen = {"kills": 0, "absent": 0, "complete": 0, "litter_after_kill": 0}
    with Forker(warm) as forker:
        start = time.perf_counter()
        code = forker.wait(forker.start(again))
        duration = time.perf_counter() - start
        assert code == 0 and digest(out, skip) == reference, f"a forked run ended {code} or wrote other files"
        for i in range(kills):
            pid = forker.start(again)
            if i % 2:  # every other kill lands while the output is being written: wait for its temporary, then kill
                deadline = time.perf_counter() + 2 * duration + 5
                while not litter(out) and forker.running(pid) and time.perf_counter() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                time.sleep(rng.uniform(0.0, 1.1 * duration))
            forker.kill(pid)
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
    final = run(again)
    assert final.returncode == 0, final.stderr[-2000:]
    assert digest(out, skip) == reference
    assert litter(out) == [], f"temporary litter left next to {out}: {litter(out)}"
    return seen
