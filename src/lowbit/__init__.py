"""lowbit: make large language models small, cheap and adaptable on ordinary hardware.

``import lowbit`` needs only torch; transformers is imported when a model is built or loaded.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os  # noqa: E402

# Compiled decode steps (Inductor C++) and lowbit's CPU kernels run OpenMP parallel regions next to
# torch's own pool; with the default spin-waiting, idle threads of one pool starve the other (a 1 B
# model decoded 40× slower on 2 cores). Passive waiting avoids that. It must be set before torch is
# first imported, so `python -m lowbit.cli` gets it; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.formats.act import ActSpec  # noqa: E402
from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.io.checkpoint import load, save  # noqa: E402
from lowbit.io.streaming import quantize_pretrained  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402
from lowbit.recipe import LayerOverride, QuantRecipe  # noqa: E402
from lowbit.tensor import QuantizedWeight, quantize_tensor  # noqa: E402
from lowbit.activation import quantize_llm_int8, quantize_w8a8  # noqa: E402

__all__ = [
    "ActSpec", "LayerOverride", "LowbitError", "QuantLinear", "QuantRecipe", "QuantSpec", "QuantizedWeight",
    "__version__", "load", "quantize", "quantize_llm_int8", "quantize_pretrained", "quantize_tensor",
    "quantize_w8a8", "save",
]
