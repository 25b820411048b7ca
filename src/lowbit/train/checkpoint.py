"""Atomic training checkpoints in ``out_dir/checkpoint/`` (safetensors + JSON only; no pickle).

Layout::

    checkpoint/trainable.safetensors   trainable parameters by model parameter name
    checkpoint/optimizer.safetensors   optimizer state tensors, keys "<param name>::<state key>"
    checkpoint/rng.safetensors         torch RNG states as uint8 tensors ("torch_cpu.rank<r>", "torch_cuda.rank<r>")
    checkpoint/state.json              step, data position, tokens, elapsed, last loss, config, RNG of
                                       python ``random`` (and numpy's keys in rng.safetensors), format version

Writing goes to ``.checkpoint.tmp/`` (every file fsynced), then the old ``checkpoint/`` is renamed to
``.checkpoint.old/``, the new one renamed into place, the directory fsynced and the old one removed.
A crash at any point leaves either ``checkpoint/`` or ``.checkpoint.old/`` complete;
:func:`find_checkpoint` picks whichever is. Only the latest good checkpoint is kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFileError
from lowbit.io.writer import fsync_dir, fsync_file
from lowbit.tensor import all_finite
from lowbit.train.errors import CheckpointMismatchError

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint"
_TMP, _OLD = ".checkpoint.tmp", ".checkpoint.old"
_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "callbacks.safetensors", "state.json")
_GROUPS = ("trainable", "optimizer", "rng", "callbacks")
SEP = "::"


@dataclass
class Checkpoint:
    path: Path
    params: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]
    callbacks: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---- writing --------------------------------------------------------------------------------------


def save_checkpoint(out_dir: str | Path, *, params: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                    rng: dict[str, torch.Tensor], state: dict[str, Any],
                    callbacks: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically to ``out_dir/checkpoint`` (replacing the previous one) and return its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = out_dir / CHECKPOINT, out_dir / _TMP, out_dir / _OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, tensors in (("trainable", params), ("optimizer", optimizer), ("rng", rng),
                              ("callbacks", callbacks or {})):
            path = tmp / f"{name}.safetensors"
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
            fsync_file(path)
        body = dict(state, format_version=FORMAT_VERSION)
        (tmp / "state.json").write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        fsync_file(tmp / "state.json")
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if _complete(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        else:
            shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _FILES)


# ---- reading --------------------------------------------------------------------------------------

def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint directory under ``out_dir`` (``checkpoint/``, else a crash-left ``.checkpoint.old/``)."""
    for name in (CHECKPOINT, _OLD):
        path = Path(out_dir) / name
        if path.is_dir() and _complete(path):
            return path
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory, checking what can be checked without the model: ``state.json``'s fields and
    the RNG states (a damaged checkpoint is a :class:`CorruptFileError` naming the file and field)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors = {}
    for name in _GROUPS:
        file = path / f"{name}.safetensors"
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{file}: cannot read checkpoint tensors ({exc})") from None
    where = path / "state.json"
    try:
        state = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CorruptFileError(f"{where}: cannot read checkpoint state ({str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise CorruptFileError(f"{where}: holds {type(state).__name__}, not a checkpoint state object")
    if state.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(f"{where}: checkpoint format {_show(state.get('format_version'))}, "
                               f"this lowbit reads {FORMAT_VERSION}")
    _check_state(state, where)
    _check_rng(tensors["rng"], state, path)
    return Checkpoint(path, tensors["trainable"], tensors["optimizer"], tensors["rng"], state, tensors["callbacks"])


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _real(value: Any) -> bool:
    """An int or float (not a bool) that a float holds (NaN and ±Inf included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _check_state(state: dict[str, Any], where: Path) -> None:
    def bad(field: str, want: str) -> CorruptFileError:
        return CorruptFileError(f"{where}: {field} must be {want}, got {_show(state.get(field))}")
    for field in ("step", "position", "tokens"):
        value = state.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(field, "an integer ≥ 0")
    elapsed = state.get("elapsed")
    if not _real(elapsed) or not math.isfinite(elapsed) or elapsed < 0:
        raise bad("elapsed", "a number ≥ 0")
    for field in ("loss", "eval_loss"):
        if field not in state:
            raise CorruptFileError(f"{where}: has no {field!r} (a number or null)")
        if state[field] is not None and not _real(state[field]):
            raise bad(field, "a number or null")
    for field in ("config", "optimizer_scalars", "callbacks"):
        if field in state and not isinstance(state[field], dict):
            raise bad(field, "an object")
    py = state.get("python_random")
    if py is not None:
        try:
            random.Random().setstate((py[0], tuple(py[1]), py[2]))
        except (TypeError, ValueError, OverflowError, IndexError, KeyError) as exc:
            raise CorruptFileError(f"{where}: python_random is not a state of Python's random module "
                                   f"({str(exc)[:100]})") from None


def _check_rng(rng: dict[str, torch.Tensor], state: dict[str, Any], path: Path) -> None:
    for key, value in rng.items():
        if key.startswith(("torch_cpu.", "torch_cuda.")):
            try:
                if value.dtype != torch.uint8 or value.dim() != 1:
                    raise ValueError(f"a {value.dtype} tensor of shape {tuple(value.shape)}")
                if key.startswith("torch_cpu."):
                    torch.Generator().set_state(value)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise CorruptFileError(f"{path / 'rng.safetensors'}: {key} is not a torch RNG state "
                                       f"({str(exc)[:100]})") from None
    np_state = state.get("numpy_random")
    if np_state is not None:
        try:
            import numpy as np

            kind, pos, has_gauss, cached = np_state
            np.random.RandomState().set_state((kind, rng["numpy_keys"].numpy().astype("uint32"), pos, has_gauss,
                                               cached))
        except ImportError:
            pass
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError, RuntimeError) as exc:
            raise CorruptFileError(f"{path}: numpy_random (state.json) with numpy_keys (rng.safetensors) is not "
                                   f"a numpy RNG state ({str(exc)[:100]})") from None


# ---- callbacks' own state (e.g. AdaLoRA's importance averages) -------------------------------------

_DICT = "__dict__"


def callback_state(callbacks: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten each callback's ``state_dict()`` (nested dicts of tensors and JSON values) into tensors
    (for safetensors) and JSON values, keyed ``<index>::<key>::…``."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[prefix] = obj
        elif isinstance(obj, dict):
            values[prefix] = _DICT
            for key, value in obj.items():
                walk(f"{prefix}{SEP}{key}", value)
        else:
            values[prefix] = obj
    for i, callback in enumerate(callbacks):
        if hasattr(callback, "state_dict"):
            walk(str(i), callback.state_dict())
    return tensors, values


def restore_callbacks(callbacks: Any, ckpt: Checkpoint) -> None:
    """Give each callback with ``load_state_dict`` the state :func:`callback_state` saved for it (a damaged one:
    :class:`CorruptFileError`)."""
    values = ckpt.state.get("callbacks", {})
    for i, callback in enumerate(callbacks):
        if not hasattr(callback, "load_state_dict") or str(i) not in values:
            continue
        try:
            root: dict[str, Any] = {}
            items = [(k, v) for k, v in values.items() if k == str(i) or k.startswith(f"{i}{SEP}")]
            items += [(k, v) for k, v in ckpt.callbacks.items() if k.startswith(f"{i}{SEP}")]
            for key, value in sorted(items, key=lambda kv: kv[0].count(SEP)):
                parts = key.split(SEP)[1:]
                if not parts:
                    continue
                node = root
                for part in parts[:-1]:
                    node = node[part]
                node[parts[-1]] = {} if isinstance(value, str) and value == _DICT else value
            callback.load_state_dict(root)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            raise CorruptFileError(f"{ckpt.path}: the saved state of callback {i} ({type(callback).__name__}) is "
                                   f"damaged ({type(exc).__name__}: {str(exc)[:200]})") from None


# ---- model / optimizer / RNG state <-> tensors -----------------------------------------------------

def check_params(named: dict[str, nn.Parameter], ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose trainable parameter names or shapes differ from the model's."""
    for name, p in named.items():
        if name not in ckpt.params:
            raise CheckpointMismatchError(f"{ckpt.path}: has no tensor for trainable parameter {name} "
                                          f"(shape {tuple(p.shape)}); it was written for another model/adapters")
        if tuple(ckpt.params[name].shape) != tuple(p.shape):
            raise CheckpointMismatchError(f"{ckpt.path}: parameter {name} has shape {tuple(ckpt.params[name].shape)} "
                                          f"in the checkpoint but {tuple(p.shape)} in the model")
        saved = ckpt.params[name]
        if not saved.is_floating_point() or not all_finite(saved):
            raise CorruptFileError(f"{ckpt.path / 'trainable.safetensors'}: parameter {name} is "
                                   + (f"stored as {saved.dtype}" if not saved.is_floating_point() else "NaN/Inf"))
    extra = sorted(set(ckpt.params) - set(named))
    if extra:
        raise CheckpointMismatchError(f"{ckpt.path}: parameter {extra[0]} (shape {tuple(ckpt.params[extra[0]].shape)}) "
                                      "is in the checkpoint but not trainable in the model")


def optimizer_tensors(optimizer: torch.optim.Optimizer,
                      named: dict[str, nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state → (tensors keyed ``"<param>::<key>"``, JSON scalars keyed the same way)."""
    tensors, scalars = {}, {}
    for name, p in named.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{SEP}{key}"] = value
            else:
                scalars[f"{name}{SEP}{key}"] = value
    return tensors, scalars


def _state_layout(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{state key: (shape, dtype)} a parameter's state has in lowbit's optimizers (empty: not known, not checked)."""
    from lowbit.train.adamw8bit import BLOCK, AdamW8bit

    if isinstance(optimizer, AdamW8bit):
        blocks = -(-p.numel() // BLOCK)
        return {"step": ((), torch.float32), "exp_avg_q": ((blocks * BLOCK,), torch.int8),
                "exp_avg_scale": ((blocks,), torch.float32), "exp_avg_sq_q": ((blocks * BLOCK,), torch.uint8),
                "exp_avg_sq_scale": ((blocks,), torch.float32)}
    if type(optimizer) in (torch.optim.AdamW, torch.optim.Adam):
        layout = {"step": ((), torch.float32), "exp_avg": (tuple(p.shape), p.dtype),
                  "exp_avg_sq": (tuple(p.shape), p.dtype)}
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            layout["max_exp_avg_sq"] = (tuple(p.shape), p.dtype)
        return layout
    return {}


def _check_param_state(name: str, state: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                       where: Path) -> None:
    if not layout:
        return
    if set(state) != set(layout):
        raise CorruptFileError(f"{where}: optimizer state of {name} has {sorted(state)}, expected {sorted(layout)}")
    for key, (shape, dtype) in layout.items():
        value = state[key]
        if key == "step" and _real(value) and not isinstance(value, torch.Tensor):
            ok = math.isfinite(value) and value >= 0
        elif isinstance(value, torch.Tensor):
            ok = tuple(value.shape) == shape and value.dtype == dtype and all_finite(value) \
                and (key != "step" or float(value) >= 0)
        else:
            ok = False
        if not ok:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else _show(value)
            raise CorruptFileError(f"{where}: optimizer state {name}{SEP}{key} is {got}, expected finite {dtype} "
                                   f"{shape}")


def restore_optimizer(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], ckpt: Checkpoint) -> None:
    """Put the checkpoint's optimizer state back (tensors keep their stored dtypes; moved to the param's device).
    Each parameter's state must have the keys, shapes and dtypes its optimizer keeps, with finite values."""
    scalars = ckpt.state.get("optimizer_scalars", {})
    where = ckpt.path / "optimizer.safetensors"
    for name, p in named.items():
        state = {}
        for source in (ckpt.optimizer, scalars):
            for key, value in source.items():
                pname, _, skey = key.rpartition(SEP)
                if pname == name:
                    on_cpu = skey == "step" and isinstance(value, torch.Tensor) and value.dim() == 0
                    state[skey] = value if not isinstance(value, torch.Tensor) or on_cpu else value.to(p.device)
        if state:
            _check_param_state(name, state, _state_layout(optimizer, p), where)
            optimizer.state[p] = state


def rng_state(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states → (uint8/int64 tensors, JSON values)."""
    tensors = {f"torch_cpu.rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[f"torch_cuda.rank{rank}"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    values: dict[str, Any] = {"python_random": [version, list(internal), gauss]}
    if "numpy" in sys.modules:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        values["numpy_random"] = [kind, int(pos), int(has_gauss), float(cached)]
    return tensors, values


def restore_rng(ckpt: Checkpoint, rank: int) -> None:
    """Restore this rank's torch RNG (rank 0's when the checkpoint has none for it), python's and numpy's."""
    cpu = ckpt.rng.get(f"torch_cpu.rank{rank}", ckpt.rng.get("torch_cpu.rank0"))
    if cpu is not None:
        torch.set_rng_state(cpu)
    cuda = ckpt.rng.get(f"torch_cuda.rank{rank}")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    py = ckpt.state.get("python_random")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = ckpt.state.get("numpy_random")
    if np_state and "numpy_keys" in ckpt.rng:
        import numpy as np

        kind, pos, has_gauss, cached = np_state
        np.random.set_state((kind, ckpt.rng["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))
