"""Seeded mutational fuzzing of lowbit's file readers: mutators for bytes and JSON/YAML documents, and the case loop.

A fuzz test gives :func:`run_cases` a reader (``reader(path)`` reads one case) and a case maker
(``make_case(rng, path) -> description`` writes one mutated copy of a real seed file or directory at
``path``). Every case must end in success or a :class:`lowbit.errors.LowbitError` within
``CASE_SECONDS`` (the lesser of wall-clock and CPU time: see ``_Clock``) and ``CASE_BYTES`` of extra memory;
anything else (another exception type, a case over the time or memory bound, a hang) is a failure, reported
with the line that reproduces it.

Memory is the case's peak resident set size over the resident size at its start: Linux resets the
peak counter (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``, so every case gets its own
peak and torch's allocations (invisible to tracemalloc) count too. Where that is unavailable, or with
``LOWBIT_FUZZ_TRACEMALLOC=1``, the tracemalloc peak is used instead (it sees Python and numpy memory
only, and slows allocation-heavy readers ~4×).

Environment:
    LOWBIT_FUZZ_CASES         cases per reader (each test has its own default)
    LOWBIT_FUZZ_SEED          master seed (default 0); case ``i`` of reader ``r`` uses ``Random(f"{r}:{seed}:{i}")``
    LOWBIT_FUZZ_ONLY          run only this case number (to reproduce a failure the test printed)
    LOWBIT_FUZZ_TRACEMALLOC   1: bound tracemalloc's peak instead of the resident set size
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz_mutators import (  # noqa: F401  (the tests import the mutators from here too)
    BOUNDARY_INTS,
    Dup,
    Raw,
    YAML_SNIPPETS,
    boundary_values,
    clone_dir,
    dumps,
    fresh_dir,
    has_raw,
    mutate_bytes,
    mutate_doc,
    mutate_file_of_dir,
    mutate_json_text,
    mutate_jsonl,
    mutate_safetensors,
    mutate_text,
    mutate_text_dir,
    mutate_yaml_text,
    raw_values,
    yaml_bomb,
)

from lowbit.errors import LowbitError

MASTER_SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))
ONLY = os.environ.get("LOWBIT_FUZZ_ONLY")
USE_TRACEMALLOC = os.environ.get("LOWBIT_FUZZ_TRACEMALLOC") == "1"
CASE_SECONDS = 1.0
CASE_BYTES = 100 << 20
HANG_SECONDS = 10  # a case still running after this is interrupted (and reported as too slow)

try:  # transformers warns about every odd config value a mutation makes: thousands of lines in `make fuzz -s`
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()
except ImportError:
    pass

REPORTS: list[FuzzReport] = []  # every report of this session, for the summary table (tests/conftest.py)


def n_cases(default: int) -> int:
    """Cases per reader: ``LOWBIT_FUZZ_CASES`` or the test's default."""
    return int(os.environ.get("LOWBIT_FUZZ_CASES", str(default)))



# ------------------------------------------------------------------------------------------- the case loop


class _Memory:
    """Extra memory of one case: peak RSS over the RSS at its start (or tracemalloc's peak)."""

    def __init__(self) -> None:
        self.rss = not USE_TRACEMALLOC and _can_reset_peak()
        self.kind = "peak RSS" if self.rss else "tracemalloc peak"
        self.base = 0

    def __enter__(self) -> _Memory:
        if not self.rss:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.rss:
            tracemalloc.stop()

    def start(self) -> None:
        if self.rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") << 10
        else:
            tracemalloc.reset_peak()
            self.base = tracemalloc.get_traced_memory()[0]

    def extra(self) -> int:
        if self.rss:
            return max(0, (_status_kb("VmHWM") << 10) - self.base)
        return tracemalloc.get_traced_memory()[1] - self.base


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {name}")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


@contextmanager
def bounded(seconds: float = CASE_SECONDS, limit: int = CASE_BYTES) -> Iterator[None]:
    """Assert that the block (ending normally or by an exception) stays within the fuzz bounds of one case."""
    with _Memory() as memory:
        memory.start()
        clock = _Clock()
        try:
            yield
        finally:
            elapsed, extra = clock.seconds(), memory.extra()
            assert elapsed < seconds, f"took {elapsed:.2f} s (bound {seconds} s)"
            assert extra < limit, f"{extra / 2**20:.0f} MB of extra memory ({memory.kind}; bound {limit >> 20} MB)"


class _Clock:
    """A case's time: the lesser of wall-clock and CPU time (all threads). A machine busy with other work (the
    other xdist worker, a parallel build) stretches the wall clock but not the CPU a case spends; threads that
    share the work stretch its CPU time but not the wall clock. A case waiting on nothing for seconds is caught
    by the wall-clock hang guard (HANG_SECONDS) instead."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return min(time.perf_counter() - self.wall, time.process_time() - self.cpu)


@contextmanager
def _hang_guard(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"case still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_kind(exc: BaseException, work: Path) -> str:
    """A LowbitError's type and message without its paths, numbers and quoted names (for counting kinds)."""
    msg = str(exc)[:400].replace(str(work), "")
    msg = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'…'", msg)
    msg = re.sub(r"\(.*?\)|\[.*?\]|\{.*?\}", "(…)", msg)
    msg = re.sub(r"\d+", "N", msg)
    msg = re.sub(r"^[^:]*(?::N)?: ", "", msg)  # the leading file name (and line)
    return f"{type(exc).__name__}: {msg[:60]}"


def _where(exc: BaseException) -> str:
    """The innermost frame of the exception that lies in lowbit (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/lowbit/" in f.filename and "/tests/" not in f.filename]
    f = (mine or frames or [None])[-1]
    return "?" if f is None else f"{Path(f.filename).name}:{f.lineno} {f.name}"


@dataclass
class FuzzReport:
    """What :func:`run_cases` saw for one reader."""

    reader: str
    cases: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # typed-error kind → count
    failures: list[str] = field(default_factory=list)  # one line each, with the reproducer
    distinct: Counter = field(default_factory=Counter)  # (exception type @ frame) → count
    seconds: float = 0.0
    slowest: float = 0.0
    peak_bytes: int = 0
    memory_kind: str = ""
    fixed: int = 0  # failures this reader had, fixed, each with a regression test (filled in by the test)

    @property
    def rejected(self) -> int:
        return sum(self.errors.values())

    def summary(self, kinds: int = 12) -> str:
        head = (f"fuzz {self.reader}: {self.cases} cases (seed {MASTER_SEED}) in {self.seconds:.1f} s: {self.ok} read, "
                f"{self.rejected} rejected with a LowbitError ({len(self.errors)} kinds), {len(self.failures)} "
                f"failures; slowest {self.slowest * 1e3:.0f} ms, most extra memory {self.peak_bytes / 2**20:.1f} MB "
                f"({self.memory_kind})")
        lines = [head]
        lines += [f"  {count:6d}  {kind}" for kind, count in self.errors.most_common(kinds)]
        if len(self.errors) > kinds:
            lines.append(f"  {sum(c for _, c in self.errors.most_common()[kinds:]):6d}  ({len(self.errors) - kinds} "
                         "other kinds)")
        for where, count in self.distinct.most_common():
            lines.append(f"  FAILURE ×{count}: {where}")
        return "\n".join(lines)


def run_cases(reader: Callable[[Path], Any], make_case: Callable[[random.Random, Path], str], n: int, *, name: str,
              work: Path, warmup: Sequence[Callable[[Path], Any]] = (),
              check: Callable[[Any], None] | None = None) -> FuzzReport:
    """Run ``n`` fuzz cases of one reader and return the report (the caller asserts on ``report.failures``).

    ``make_case(rng, work / "case")`` writes case i's input (deterministic in ``rng``) and describes it;
    ``reader(path)`` reads it; ``check(result)``, when given, checks a successful read's result (an
    AssertionError there is a failure too). ``warmup`` callables run first, outside the bounds (lazy
    imports, caches): each gets the work directory.
    """
    report = FuzzReport(name)
    case_path = work / "case"
    for fn in warmup:
        fn(work)
    cases = [int(ONLY)] if ONLY is not None else range(n)
    start = time.perf_counter()
    with _Memory() as memory:
        report.memory_kind = memory.kind
        for i in cases:
            rng = random.Random(f"{name}:{MASTER_SEED}:{i}")
            how = make_case(rng, case_path)
            repro = f"{name} case {i}: LOWBIT_FUZZ_SEED={MASTER_SEED} LOWBIT_FUZZ_ONLY={i} ({how})"
            memory.start()
            clock = _Clock()
            problem = None
            error: Exception | None = None
            try:
                with _hang_guard(HANG_SECONDS):
                    result = reader(case_path)
                    if check is not None:
                        check(result)
                    del result
            except Exception as exc:  # noqa: BLE001 - the point: nothing but LowbitError may escape
                error = exc
            elapsed = clock.seconds()
            extra = memory.extra()
            if error is None:
                report.ok += 1
            elif isinstance(error, LowbitError):
                report.errors[error_kind(error, work)] += 1
            else:
                problem = f"{type(error).__name__} at {_where(error)}"
                report.failures.append(f"{repro}: {type(error).__name__}: {str(error)[:300]}")
            del error
            report.cases += 1
            report.slowest = max(report.slowest, elapsed)
            report.peak_bytes = max(report.peak_bytes, extra)
            if elapsed > CASE_SECONDS:
                problem = problem or "over the time bound"
                report.failures.append(f"{repro}: took {elapsed:.2f} s")
            if extra > CASE_BYTES:
                problem = problem or "over the memory bound"
                report.failures.append(f"{repro}: {extra / 2**20:.0f} MB of extra memory ({memory.kind})")
            if problem is not None:
                report.distinct[problem] += 1
    report.seconds = time.perf_counter() - start
    REPORTS.append(report)
    return report


def format_summary(reports: Sequence[FuzzReport]) -> list[str]:
    """The table ``make fuzz`` ends with: one row per reader."""
    header = (f"{'reader':<24} {'cases':>7} {'read':>7} {'typed':>7} {'kinds':>6} {'fail':>5} {'fixed':>6} "
              f"{'seconds':>8} {'slowest':>8} {'memory':>8}")
    rows = [header]
    for r in reports:
        rows.append(f"{r.reader:<24} {r.cases:>7} {r.ok:>7} {r.rejected:>7} {len(r.errors):>6} {len(r.failures):>5} "
                    f"{r.fixed:>6} {r.seconds:>8.1f} {r.slowest * 1e3:>6.0f}ms {r.peak_bytes / 2**20:>6.1f}MB")
    rows.append(f"{'total':<24} {sum(r.cases for r in reports):>7} {sum(r.ok for r in reports):>7} "
                f"{sum(r.rejected for r in reports):>7} {'':>6} {sum(len(r.failures) for r in reports):>5} "
                f"{sum(r.fixed for r in reports):>6} {sum(r.seconds for r in reports):>8.1f}")
    rows.append("read: cases read; typed: rejected with a LowbitError (kinds: distinct messages); fail: cases that "
                "ended otherwise; fixed: distinct failures fuzzing found and fixed, each with a regression test; "
                "memory: most extra memory of one case")
    return rows
