from lowbit.nn.quant_embedding import SharedQuantEmbedding
from lowbit.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear", "SharedQuantEmbedding"]
