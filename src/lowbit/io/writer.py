"""Atomic output directories and a sharded safetensors writer that never holds the whole model."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lowbit.errors import OutputExistsError
from lowbit.io.safetensors_io import INDEX_NAME, SINGLE_NAME
from lowbit.io.st_format import StreamingFile

DEFAULT_SHARD_BYTES = 1 << 30


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one atomic step, on error it is removed.

    Crash safety (SIGKILL, power loss): every file is fsynced before the rename and the parent directory after
    it, so ``out`` is either absent, the complete previous version or the complete new one. An existing ``out``
    is swapped with the new one by one ``renameat2(RENAME_EXCHANGE)`` (Linux), never deleted first; elsewhere a
    two-step rename whose interruption the next run repairs. Temporary directories of dead processes (their pid
    is in the name) are removed when the next writer of the same output starts. Two processes writing the same
    ``out`` without ``overwrite``: the second to finish gets OutputExistsError; with ``overwrite`` the last wins.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_output_dir(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, out)  # out absent (or an empty directory): atomic
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        if not overwrite:
            raise OutputExistsError(f"{out}: was created by another process while this one was writing it; "
                                    "nothing of this run was kept (pass --overwrite to replace it)") from None
        if _exchange(tmp, out):  # tmp now holds the previous version
            fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / "previous")  # interrupted here: recover_output_dir puts it back
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    fsync_dir(out.parent)


def recover_output_dir(out: Path) -> None:
    """Repair what a killed writer of ``out`` (a directory or a single file) left: restore a previous version parked by the two-step rename, and
    remove temporary directories whose process is gone."""
    parent = out.parent
    if not parent.is_dir():
        return
    for item in parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, pid = _litter(item.name, out.name)
        if kind is None or _alive(pid):
            continue
        parked = item / "previous"
        if kind == "old" and parked.is_dir() and not out.exists():
            os.rename(parked, out)
            fsync_dir(parent)
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def _litter(name: str, out_name: str) -> tuple[str | None, int]:
    rest = name[len(out_name) + 2:] if name.startswith(f".{out_name}.") else ""
    kind, _, tail = rest.partition("-")
    pid = tail.partition("-")[0]
    if kind not in ("tmp", "old") or not pid.isdigit():
        return None, 0
    return kind, int(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first)."""
    dirs = []
    for current, _, files in os.walk(root):
        dirs.append(Path(current))
        for name in files:
            path = Path(current) / name
            if not path.is_symlink():
                fsync_file(path)
    for directory in reversed(dirs):
        fsync_dir(directory)


def replace_durably(tmp: Path, dest: Path) -> None:
    """``os.replace(tmp, dest)`` with ``tmp`` fsynced before and the directory after: survives a power cut."""
    fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def write_json_durably(path: Path, data: dict[str, Any]) -> None:
    """A run's JSON record (sorted keys), written to a temporary name and durably renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    replace_durably(tmp, path)


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A training run's directory (logs, checkpoint, results): created, or kept for ``resume``, or replaced with
    ``overwrite``; an existing non-empty one is otherwise an OutputExistsError."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (use --resume to continue its run, or --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, path)


class ShardWriter:
    """Writes tensors as safetensors shards of about ``max_shard_bytes``, streaming them to disk.

    Each tensor's bytes go to disk as soon as it is added, so memory stays at one tensor whatever
    the model size. One shard is written as ``model.safetensors``; several as
    ``model-0000i-of-0000n.safetensors`` with a Hugging Face style ``model.safetensors.index.json``.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._current: StreamingFile | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        if self._current is None:
            path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
            self._current = StreamingFile(path)
            self._shards.append((path, []))
        self._current.add(name, tensor)
        self._shards[-1][1].append(name)
        self.total_bytes += tensor.numel() * tensor.element_size()
        if self._current.nbytes >= self.max_shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def finish(self) -> list[Path]:
        self._close_current()
        if not self._shards:
            raise ValueError("no tensors were written")
        if len(self._shards) == 1:
            final = self.directory / SINGLE_NAME
            os.rename(self._shards[0][0], final)
            return [final]
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        write_json(self.directory / INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return finals
