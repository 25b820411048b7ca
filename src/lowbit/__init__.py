"""lowbit: make large language models small, cheap and adaptable on ordinary hardware.

``import lowbit`` needs only torch; transformers is imported when a model is built or loaded.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lowbit.errors import LowbitError
from lowbit.formats.act import ActSpec  # noqa: E402
from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.io.checkpoint import load, save  # noqa: E402
from lowbit.io.streaming import quantize_pretrained  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402
from lowbit.recipe import LayerOverride, QuantRecipe  # noqa: E402
from lowbit.tensor import QuantizedWeight, quantize_tensor  # noqa: E402
from lowbit.activation import quantize_llm_int8, quantize_w8a8  # noqa: E402
from lowbit.io import hf_integration as _hf_integration  # noqa: E402

_hf_integration.install()  # from_pretrained reads lowbit directories (registers when transformers loads)

__all__ = [
    "ActSpec", "LayerOverride", "LowbitError", "QuantLinear", "QuantRecipe", "QuantSpec", "QuantizedWeight",
    "__version__", "load", "quantize", "quantize_llm_int8", "quantize_pretrained", "quantize_tensor",
    "quantize_w8a8", "save",
]
