"""Checkpoint tensor names → model state-dict names, renamed as transformers' ``from_pretrained`` does.

transformers renames some checkpoint keys on load (GPT-NeoX stores its head as ``embed_out.weight``
and the model calls it ``lm_head.weight``; old files say ``LayerNorm.gamma``; …). The tables are
transformers' own, never copied here:

- transformers ≥ 5: ``transformers.conversion_mapping.get_model_conversion_mapping(model)`` — its
  ``WeightRenaming`` entries rename keys; its ``WeightConverter`` entries also reshape tensors
  (split fused qkv, stack experts …), which lowbit does not do: :meth:`KeyRenamer.converter_for`
  names them so a missing tensor can be explained.
- transformers 4.x: the model's ``_checkpoint_conversion_mapping`` (regex → replacement, first match
  wins) and ``_fix_state_dict_key_on_load`` (gamma/beta, weight_g/weight_v).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn


class KeyRenamer:
    """Renames one checkpoint key the way transformers does when loading into ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self._renamings: list[Any] = []
        self._converters: list[Any] = []
        self._legacy: Callable[[str], str] | None = None
        transforms = _conversion_mapping(model)
        if transforms is None:
            self._legacy = _legacy_renamer(model)
            return
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def __bool__(self) -> bool:
        return bool(self._renamings or self._legacy)

    def __call__(self, key: str) -> str:
        if self._legacy is not None:
            return self._legacy(key)
        for renaming in self._renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    def converter_for(self, key: str) -> str | None:
        """Description of the transformers weight converter (a tensor reshaping lowbit does not apply)
        that would take ``key``, if any."""
        renamed = self(key)
        for converter in self._converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                ops = ", ".join(type(op).__name__ for op in getattr(converter, "operations", ()))
                return f"{key} → {target} ({ops or 'conversion'})"
        return None


def _conversion_mapping(model: nn.Module) -> list[Any] | None:
    """transformers ≥ 5's transforms for ``model`` (legacy renames included); None on older versions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return []
    return list(get_model_conversion_mapping(model))


def _legacy_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """transformers 4.x: the class's regex table, then its per-key legacy fix."""
    mapping: dict[str, str] = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    fix = getattr(model, "_fix_state_dict_key_on_load", None)
    if not mapping and fix is None:
        return None
    patterns = [(re.compile(p), r) for p, r in mapping.items()]

    def rename(key: str) -> str:
        for pattern, replacement in patterns:
            new, count = pattern.subn(replacement, key)
            if count:
                key = new
                break
        if fix is not None:
            fixed = fix(key)
            key = fixed[0] if isinstance(fixed, tuple) else fixed
        return key

    return rename
