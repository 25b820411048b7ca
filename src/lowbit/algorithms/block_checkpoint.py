"""Resumable layer-by-layer runs: each finished block is saved, a killed run continues after the last one.

The runner (:func:`lowbit.algorithms.calibrate.run_layer_by_layer`) asks a :class:`BlockCheckpoint` whether a
block is already done; if so, the block's saved state is put back — its quantized layers (packed tensors, spec
and bias) and every other parameter and buffer (AWQ folds scales into norms) — and the block is only run to
produce the next block's inputs. A block's file is written to a temporary name, fsynced and renamed, then the
list of finished blocks (``state.json``) likewise, so a kill at any moment leaves a consistent checkpoint.
The fingerprint (method, specs, calibration, model) must match, or the checkpoint is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "lowbit-block-checkpoint"


class BlockCheckpoint:
    """Finished blocks of one run under ``path`` (a directory); ``fingerprint`` identifies the run."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.finished: dict[int, dict[str, Any]] = {}
        self.resumed = 0
        self._load()

    def _load(self) -> None:
        state_file = self.path / "state.json"
        try:
            state = json.loads(state_file.read_text())
            ok = state.get("format") == FORMAT and state.get("fingerprint") == self.fingerprint
            blocks = {int(k): v for k, v in state.get("blocks", {}).items()} if ok else {}
            if not all(isinstance(v, dict) and isinstance(v.get("layers"), dict) for v in blocks.values()):
                blocks = {}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            blocks = {}
        if not blocks and self.path.exists():  # another run's, or unreadable: start over
            shutil.rmtree(self.path, ignore_errors=True)
        self.finished = {i: v for i, v in blocks.items() if (self.path / f"block-{i}.safetensors").is_file()}

    def done(self, index: int) -> bool:
        return index in self.finished

    def save(self, block: nn.Module, index: int) -> None:
        from safetensors.torch import save_file

        from lowbit.io.writer import fsync_dir, fsync_file
        from lowbit.nn.quant_linear import QuantLinear

        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {}
        quantized = {name: m for name, m in block.named_modules() if isinstance(m, QuantLinear)}
        for name, module in quantized.items():
            for key, t in module.weight.tensors.items():
                tensors[f"q::{name}::{key}"] = t.detach().cpu().contiguous()
            if module.bias is not None:
                tensors[f"q::{name}::bias"] = module.bias.detach().cpu().contiguous()
            layers[name] = {"spec": module.weight.spec.to_dict(), "shape": list(module.weight.shape),
                            # the buffers' registration order: the saved model's tensor (and byte) order
                            "keys": [k for k in module._buffers if k in module.weight.tensors]}
        inside = tuple(f"{n}." for n in quantized)
        for key, t in block.state_dict().items():
            if not key.startswith(inside) and t is not None:
                tensors[f"p::{key}"] = t.detach().cpu().contiguous()
        tmp = self.path / f".block-{index}.tmp"
        save_file(tensors, str(tmp))
        fsync_file(tmp)
        os.replace(tmp, self.path / f"block-{index}.safetensors")
        self.finished[index] = {"layers": layers}
        state = {"format": FORMAT, "fingerprint": self.fingerprint,
                 "blocks": {str(i): v for i, v in sorted(self.finished.items())}}
        tmp = self.path / ".state.tmp"
        tmp.write_text(json.dumps(state))
        fsync_file(tmp)
        os.replace(tmp, self.path / "state.json")
        fsync_dir(self.path)

    def restore(self, block: nn.Module, index: int) -> dict[str, nn.Module]:
        """Put block ``index`` back as it was saved; returns {local name: QuantLinear} of its quantized layers.

        Everything read is checked against the block it goes into (each layer's spec, the tensors that spec
        stores for the layer's shape, with their dtypes; finite floats): a damaged checkpoint is a
        :class:`CorruptFileError` naming the block file and the layer."""
        from lowbit.errors import CorruptFileError, LowbitError
        from lowbit.formats.codecs import stored_layout
        from lowbit.formats.spec import QuantSpec
        from lowbit.io.safetensors_io import open_safetensors
        from lowbit.models.targets import linear_dims, set_submodule
        from lowbit.nn.quant_linear import QuantLinear
        from lowbit.tensor import QuantizedWeight, all_finite

        file = self.path / f"block-{index}.safetensors"
        start_over = f"delete {self.path} to start over"
        with open_safetensors(file) as handle:
            saved = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open handle)
        for key, tensor in saved.items():
            if not all_finite(tensor):
                raise CorruptFileError(f"{file}: tensor {key} holds NaN/Inf; {start_over}")
        device = next((p.device for p in block.parameters() if p.device.type != "meta"), torch.device("cpu"))
        restored: dict[str, nn.Module] = {}
        for name, info in self.finished[index]["layers"].items():
            where = f"{file}: layer {name}"
            try:
                module = block.get_submodule(name)
                in_features, out_features = linear_dims(module)
            except (AttributeError, TypeError):
                raise CorruptFileError(f"{where} is not a linear layer of this block; {start_over}") from None
            try:
                spec = QuantSpec.from_dict(info["spec"])
                layout = stored_layout(spec, (out_features, in_features))
            except LowbitError as exc:
                raise CorruptFileError(f"{where}: {exc}; {start_over}") from None
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CorruptFileError(f"{where}: its spec is not a quantization spec; {start_over}") from None
            keys = info.get("keys")
            if info.get("shape") != [out_features, in_features] or not isinstance(keys, list) \
                    or sorted(map(str, keys)) != sorted(layout) or len(keys) != len(layout):
                raise CorruptFileError(f"{where}: the saved shape/tensor list does not fit a {out_features}×"
                                       f"{in_features} layer of {spec.format}; {start_over}")
            parts = {}
            for key in keys:
                tensor = saved.get(f"q::{name}::{key}")
                shape, dtype = layout[key]
                if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    got = "missing" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
                    raise CorruptFileError(f"{where}: tensor {key} is {got}, expected {dtype} {shape}; {start_over}")
                parts[key] = tensor
            bias = saved.get(f"q::{name}::bias")
            has_bias = getattr(module, "bias", None) is not None
            if has_bias != (bias is not None) or (bias is not None and (tuple(bias.shape) != (out_features,)
                                                                        or not bias.is_floating_point())):
                raise CorruptFileError(f"{where}: its bias does not fit the layer; {start_over}")
            try:
                qw = QuantizedWeight(spec, (out_features, in_features), parts)
            except (LowbitError, ValueError, RuntimeError) as exc:
                raise CorruptFileError(f"{where}: {exc}; {start_over}") from None
            layer = QuantLinear.from_weight(qw, bias).to(device)
            set_submodule(block, name, layer)
            restored[name] = layer
        rest = {k[3:]: v for k, v in saved.items() if k.startswith("p::")}
        own = block.state_dict()
        for key, tensor in rest.items():
            want = own.get(key)
            if want is not None and (tuple(want.shape) != tuple(tensor.shape)
                                     or want.is_floating_point() != tensor.is_floating_point()):
                raise CorruptFileError(f"{file}: tensor {key} is {tensor.dtype} {tuple(tensor.shape)}, the block's is "
                                       f"{want.dtype} {tuple(want.shape)}; {start_over}")
        try:
            missing = block.load_state_dict(rest, strict=False).missing_keys
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CorruptFileError(f"{file}: does not hold this block ({exc}); {start_over}") from None
        inside = tuple(f"{n}." for n in restored)
        if [k for k in missing if not k.startswith(inside)]:
            raise CorruptFileError(f"{file}: misses parameters of this block; {start_over}")
        self.resumed += 1
        return restored

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def run_fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able descriptions (recipe, calibration, model identity) and tensors."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]
