"""ActSpec: one serialisable description of how a linear layer's *input activations* are quantized.

Weights are described by :class:`~lowbit.formats.spec.QuantSpec`; an ``ActSpec`` on a
:class:`~lowbit.nn.QuantLinear` additionally quantizes its input ``x`` [..., in_features] before the
matmul (W8A8), either with scales computed from ``x`` at run time (``dynamic``) or with a
calibrated scale/zero-point stored as the module's ``input_scale``/``input_zero`` buffers (static).
``outlier_threshold`` turns on LLM.int8() (Dettmers et al. 2022): input columns holding any
``|x| > threshold`` bypass quantization and are multiplied in floating point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import spec_from_dict

ACT_GRANULARITIES = ("tensor", "token")
OBSERVERS = ("minmax", "ema", "percentile", "mse")
ACT_BITS = (4, 5, 6, 7, 8)  # codes must fit an int8 GEMM operand
DEFAULT_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s threshold


@dataclass(frozen=True)
class ActSpec:
    """How the input of a linear layer is quantized.

    Attributes:
        bits: integer width of the activation codes (4…8).
        symmetric: True: ``q = round(x/S)``, zero-point 0. False: ``q = round(x/S + Z)`` over
            [0, 2**bits − 1] (suits one-sided inputs such as post-GELU activations).
        granularity: one scale for the whole ``tensor``, or one per ``token`` (per row of ``x``
            flattened to [tokens, in_features]); ``token`` needs ``dynamic``.
        dynamic: scales are computed from each ``x`` at run time; otherwise a calibrated
            ``input_scale``/``input_zero`` pair is stored with the layer.
        observer: static only: how calibration chooses the range: ``minmax`` (running min/max),
            ``ema`` (moving-average min/max), ``percentile`` (clip at ``percentile``), ``mse``
            (clipping range minimising the quantization MSE of the observed values).
        percentile: the ``percentile`` observer's clipping point, in (0, 100].
        ema_momentum: the ``ema`` observer's weight of each new batch, in (0, 1].
        outlier_threshold: LLM.int8(): input columns where any ``|x|`` exceeds it stay in floating
            point (dynamic only). ``None``: no outlier decomposition.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    dynamic: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    ema_momentum: float = 0.1
    outlier_threshold: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ACT_BITS:
            raise InvalidSpecError(f"activation bits={self.bits!r} is out of range; expected one of {ACT_BITS}")
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSpecError(f"activation {name} must be true or false, got {getattr(self, name)!r}")
        if self.granularity not in ACT_GRANULARITIES:
            raise InvalidSpecError(f"unknown activation granularity {self.granularity!r}; "
                                   f"expected one of {ACT_GRANULARITIES}")
        if self.observer not in OBSERVERS:
            raise InvalidSpecError(f"unknown observer {self.observer!r}; expected one of {OBSERVERS}")
        if not self.dynamic and self.granularity != "tensor":
            raise InvalidSpecError(f"static activation quantization needs granularity 'tensor' (one calibrated "
                                   f"scale), got {self.granularity!r}; use dynamic=True for per-token scales")
        if not _number(self.percentile) or not 0 < self.percentile <= 100:
            raise InvalidSpecError(f"percentile={self.percentile!r} must be in (0, 100]")
        if not _number(self.ema_momentum) or not 0 < self.ema_momentum <= 1:
            raise InvalidSpecError(f"ema_momentum={self.ema_momentum!r} must be in (0, 1]")
        if self.outlier_threshold is not None:
            if not _number(self.outlier_threshold) or not self.outlier_threshold > 0:
                raise InvalidSpecError(f"outlier_threshold={self.outlier_threshold!r} must be a positive number")
            if not self.dynamic:
                raise InvalidSpecError("outlier_threshold (LLM.int8) finds outlier columns at run time; "
                                       "it needs dynamic=True")
            object.__setattr__(self, "outlier_threshold", float(self.outlier_threshold))
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "ema_momentum", float(self.ema_momentum))

    # ---- constructors for the common schemes -------------------------------------------------
    @classmethod
    def static(cls, observer: str = "minmax", symmetric: bool = True, bits: int = 8, **kw: Any) -> "ActSpec":
        """Static per-tensor scales calibrated with ``observer``."""
        return cls(bits, symmetric, "tensor", False, observer, **kw)

    @classmethod
    def dynamic_per_token(cls, symmetric: bool = True, bits: int = 8) -> "ActSpec":
        return cls(bits, symmetric, "token", True)

    @classmethod
    def llm_int8(cls, threshold: float = DEFAULT_OUTLIER_THRESHOLD) -> "ActSpec":
        """LLM.int8(): dynamic symmetric per-token int8 with float outlier columns."""
        return cls(8, True, "token", True, outlier_threshold=threshold)

    # ---- helpers ---------------------------------------------------------------------------
    def describe(self) -> str:
        """Short human name, e.g. ``a8-tok-dyn-sym``, ``a8-t-static-asym-mse``, ``a8-tok-dyn-sym-o6``."""
        gran = "-tok" if self.granularity == "token" else "-t"
        mode = "-dyn" if self.dynamic else "-static"
        name = f"a{self.bits}{gran}{mode}" + ("-sym" if self.symmetric else "-asym")
        if not self.dynamic and self.observer != "minmax":
            name += f"-{self.observer}"
            if self.observer == "percentile":
                name += f"{self.percentile:g}"
        if self.outlier_threshold is not None:
            name += f"-o{self.outlier_threshold:g}"
        return name

    def replace(self, **changes: Any) -> "ActSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "act_spec") -> "ActSpec":
        return spec_from_dict(cls, data, where)


def _number(value: Any) -> bool:
    """A real number (no bool) within the float range (an integer of 400 digits is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
