"""transformers integration: ``AutoModelForCausalLM.from_pretrained(lowbit_dir)`` builds QuantLinear layers.

A directory ``lowbit quantize`` wrote says ``quantization_config.quant_method == "lowbit"`` in its
config.json. transformers picks the quantizer for that method from its registry; lowbit registers
:class:`LowbitConfig` and a ``LowbitHfQuantizer`` there (transformers' public
``register_quantization_config`` / ``register_quantizer``). Before the weights load, the quantizer
swaps every module the config lists for an empty (meta) :class:`~lowbit.nn.quant_linear.QuantLinear`
— the same swap :func:`lowbit.load` makes — so transformers' own loader fills the packed buffers
(``qdata``, ``scale`` …) from the safetensors files, in their stored dtypes. The model is then
lowbit's: same forward, adapters train over it (``lowbit.peft`` or peft through
``lowbit.peft.hf.register_quant_linear``), ``save_pretrained`` writes a directory
:func:`lowbit.load` reads.

``import lowbit`` must not import transformers (seconds). :func:`install` therefore registers at
once only when transformers' quantizer registry (``transformers.quantizers.auto``, imported by
``modeling_utils``) is already loaded; otherwise it puts a small finder on ``sys.meta_path`` that
runs the registration right after that module finishes executing, whatever imports it, and removes
itself. Import order does not matter.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from lowbit.io.qconfig import QUANT_METHOD, parse_activation_config, parse_quantization_config

REGISTRY_MODULE = "transformers.quantizers.auto"


def install() -> None:
    """Register lowbit with transformers now if its quantizer registry is loaded, else on its import."""
    if REGISTRY_MODULE in sys.modules:
        register()
        return
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def register() -> bool:
    """Register :class:`LowbitConfig` and the lowbit HfQuantizer with transformers (idempotent).

    Returns False where this transformers has no registration hooks (older than 4.45ish).
    """
    return _register_into(importlib.import_module(REGISTRY_MODULE))


def _register_into(auto: ModuleType) -> bool:
    if not hasattr(auto, "register_quantizer") or not hasattr(auto, "register_quantization_config"):
        return False
    config_cls, quantizer_cls = _classes()
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not config_cls:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class (module reloaded)
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer_cls:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers.quantizers.auto`` is about to be imported, wraps the
    real loader so that :func:`register` runs once the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _RegisterOnImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            _register_into(module)
        except Exception as exc:  # noqa: BLE001 - never break the user's transformers import
            import warnings

            warnings.warn(f"lowbit: could not register its quantizer with transformers ({exc}); "
                          "from_pretrained will not read lowbit directories", stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package … of the wrapped loader
        return getattr(self._loader, name)


@cache
def _classes() -> tuple[type, type]:
    """The config and quantizer classes, defined once transformers is importable."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LowbitConfig(QuantizationConfigMixin):
        """config.json's ``quantization_config`` of a lowbit directory, kept as written.

        Its attributes are exactly the block's fields (``format_version``, ``default_spec``,
        ``modules`` …; see :mod:`lowbit.io.qconfig`), so ``to_dict()`` writes it back unchanged.
        """

        def __init__(self, **fields: Any) -> None:
            fields["quant_method"] = QUANT_METHOD
            self.__dict__.update(fields)
            self.layer_specs()  # validate now: a bad block fails before any model is built

        def layer_specs(self) -> tuple[dict[str, Any], dict[str, Any]]:
            """({module name: QuantSpec}, {module name: ActSpec}) of the quantized layers."""
            where = "config.json quantization_config"
            specs, _ = parse_quantization_config(self.to_dict(), where)
            return specs, parse_activation_config(self.to_dict(), where, specs)

    class LowbitHfQuantizer(HfQuantizer):
        """Loads lowbit directories: the listed layers become QuantLinear before the weights load."""

        requires_calibration = True  # reads quantized directories; lowbit quantize makes them
        quantization_config: LowbitConfig

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                from lowbit.errors import UnsupportedModelError

                raise UnsupportedModelError("lowbit models cannot be offloaded to disk (device_map has 'disk')")

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            import torch

            from lowbit.io.checkpoint import _install_quant_linears, _install_shared_embeddings

            specs, act_specs = self.quantization_config.layer_specs()
            where = "config.json quantization_config"
            _install_quant_linears(model, specs, where, act_specs)
            _install_shared_embeddings(model, self.quantization_config.to_dict(), specs, where,
                                       getattr(model, "dtype", None) or torch.float32)
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from lowbit.nn.quant_linear import QuantLinear

            for module in model.modules():
                if isinstance(module, QuantLinear) and module.bias is not None:
                    module.bias.requires_grad_(False)  # transformers made it trainable; lowbit.load keeps it frozen
            source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            if source and Path(source).is_dir():
                model.lowbit_source = Path(source)
            model.lowbit_method = getattr(self.quantization_config, "method", None)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True  # adapters over the frozen quantized base

        @property
        def is_qat_trainable(self) -> bool:
            return False

    for cls in (LowbitConfig, LowbitHfQuantizer):
        cls.__qualname__ = cls.__name__  # found by name through this module's __getattr__ (pickle, repr)
    return LowbitConfig, LowbitHfQuantizer


def __getattr__(name: str) -> type:
    """``LowbitConfig`` and ``LowbitHfQuantizer``, defined on first access (this imports transformers)."""
    if name in ("LowbitConfig", "LowbitHfQuantizer"):
        return _classes()[name == "LowbitHfQuantizer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
