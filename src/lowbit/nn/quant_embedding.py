"""SharedQuantEmbedding: an input embedding that reads its rows from a quantized output head.

A model whose output head is tied to its input embedding (``tie_word_embeddings``) stores one
matrix [vocab, hidden] for both. When that head is quantized with the recipe option
``tied_head: share`` the embedding keeps sharing it: the token lookup dequantizes just the rows it
needs from the head's stored tensors, so the model stores the matrix once, quantized — as llama.cpp
stores a tied model's ``token_embd`` (Q6_K in its Q4_K_M mix). The default (``untie``) keeps a float
embedding beside the quantized head instead.

The module owns no tensors (the head does), so ``state_dict()`` and the saved checkpoint hold the
matrix once, under the head's name; ``quantization_config.shared_embeddings`` ({embedding module:
head module}) tells :func:`lowbit.load` to rebuild the sharing.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit.formats import codecs
from lowbit.formats.primitives import scale_shape
from lowbit.nn.quant_linear import QuantLinear


class SharedQuantEmbedding(nn.Module):
    """``embedding(ids)`` = rows ``ids`` of the dequantized weight of ``head`` (a :class:`QuantLinear`
    [vocab, hidden]). The head is referenced, not registered as a child, so its tensors are stored once."""

    def __init__(self, head: QuantLinear, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype  # of the looked-up rows (the float embedding's dtype it replaces)
        self._head = (head,)  # a tuple hides it from nn.Module's registration (no second copy in state_dict)
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = padding_idx
        self._scale_cache: tuple[int, torch.Tensor] | None = None

    @property
    def head(self) -> QuantLinear:
        return self._head[0]

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized matrix [vocab, hidden] (float32), for code that reads ``embedding.weight``;
        a copy — the lookup never builds it."""
        return self.head.weight.dequantize(torch.float32)

    def _row_scales(self) -> torch.Tensor | None:
        """Double-quantized scales decoded once to float32 [R, G] (None when the scales are stored plainly)."""
        head = self.head
        if not head.spec.double_quant:
            return None
        key = head.qdata.data_ptr()
        if self._scale_cache is None or self._scale_cache[0] != key:
            qw = head.weight
            sshape = scale_shape(qw.shape, qw.spec)
            self._scale_cache = (key, codecs._load_scale(qw.tensors, qw.spec, sshape).float())
        return self._scale_cache[1]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows [len(ids), hidden] of the head's weight (ids: 1-D int64)."""
        qw = self.head.weight
        spec, (n, k) = qw.spec, qw.shape
        r, _ = scale_shape(qw.shape, spec)
        if spec.format in ("fp16", "bf16"):
            return qw.tensors["qdata"][ids].to(dtype)
        tensors = {"qdata": qw.tensors["qdata"][ids]}
        decoded = self._row_scales()
        row_spec = spec
        if decoded is not None:  # plain float32 scales for the gathered rows
            row_spec = dataclasses.replace(spec, double_quant=False, scale_dtype="float32")
            tensors["scale"] = decoded[ids] if r == n else decoded
        elif "scale" in qw.tensors:
            tensors["scale"] = qw.tensors["scale"][ids] if r == n else qw.tensors["scale"]
        if "zero" in qw.tensors:
            tensors["zero"] = qw.tensors["zero"][ids] if r == n else qw.tensors["zero"]
        return codecs.decode(tensors, row_spec, (int(ids.numel()), k), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        if flat.numel() == 0:
            return torch.empty(*input_ids.shape, self.embedding_dim, dtype=self.dtype, device=self.head.qdata.device)
        if (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        unique, inverse = torch.unique(flat, return_inverse=True)
        out = self.rows(unique, self.dtype)[inverse]
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, shared with the quantized head ({self.head.spec.describe()})"
