"""A lean greedy decode loop: static KV cache, one compiled decode step, the model's own forward.

The model is any Hugging Face causal LM (float or quantized by lowbit) used unchanged: the loop
calls its ``forward`` with a transformers ``StaticCache`` and explicit ``cache_position``s, so every
decode step has the same shapes and the same tensor addresses. That lets ``torch.compile`` turn the
step into one graph (Inductor C++ on CPU; CUDA graphs on GPU via ``mode="reduce-overhead"``), which
removes the per-token Python/dispatch overhead that dominates small and mid-sized models.

Compilation happens on the first decode step (seconds to a minute, once per Generator); when it is
unavailable (no C++ compiler, an unsupported op) the loop warns once and runs eagerly. Greedy tokens
from the compiled loop equal eager greedy decoding (tested); logits agree to float rounding.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.kernels.dispatch import prepare_model


@dataclass
class GenerationResult:
    """Tokens produced by :meth:`Generator.generate` and how long each phase took."""

    prompt_tokens: int
    tokens: list[int]  # generated token ids (the prompt excluded)
    prefill_s: float
    decode_s: float  # time for every generated token after the first (which the prefill yields)
    compiled: bool
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # per token, when asked for

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Generator:
    """Greedy generation for one causal LM with a static KV cache and a compiled decode step.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), float or with QuantLinear layers.
        max_cache_len: tokens the static cache holds (prompt + generated); at least the longest
            prompt plus ``max_new_tokens`` of any later call.
        compile: ``True`` compiles the decode step (falls back to eager with a warning where that
            fails); ``False`` runs eagerly.
    """

    def __init__(self, model: nn.Module, max_cache_len: int = 512, compile: bool = True) -> None:
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise UnsupportedModelError(f"{type(model).__name__}: generation needs a transformers causal LM")
        if model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head; it cannot generate text")
        from transformers import StaticCache

        self.model = model.eval()
        prepare_model(model)  # repack quantized weights for their kernels before anything is traced
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self._eager_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._forward_last
        self._step = self._eager_step
        self.compiled = False
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(self._forward_last, mode=mode, fullgraph=False, dynamic=False)
            self.compiled = True

    def _forward_last(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.cache, cache_position=cache_position,
                         use_cache=True)
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 keep_logits: bool = False) -> GenerationResult:
        """Greedily extend ``input_ids`` ([1, T] or [T] int64) by up to ``max_new_tokens`` tokens.

        Stops early after ``eos_token_id`` when given. ``keep_logits`` keeps each step's float32
        logits [vocab] (for comparisons).
        """
        ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        if ids.shape[0] != 1:
            raise LowbitError(f"generation takes one prompt at a time, got a batch of {ids.shape[0]}")
        prompt_len = ids.shape[1]
        if prompt_len == 0:
            raise LowbitError("the prompt is empty")
        if max_new_tokens < 1:
            raise LowbitError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_cache_len:
            raise LowbitError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                              f"length {self.max_cache_len}")
        ids = ids.to(self.device)
        self.cache.reset()
        logits_kept: list[torch.Tensor] = []

        start = time.perf_counter()
        logits = self._forward_last(ids, torch.arange(prompt_len, device=self.device))  # eager prefill
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        first = int(token.item())  # also synchronizes the device
        prefill_s = time.perf_counter() - start
        tokens = [first]
        if keep_logits:
            logits_kept.append(logits[0].cpu())

        start = time.perf_counter()
        position = torch.empty(1, dtype=torch.long, device=self.device)
        for i in range(max_new_tokens - 1):
            if eos_token_id is not None and tokens[-1] == eos_token_id:
                break
            position.fill_(prompt_len + i)
            logits = self._run_step(token, position)
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(int(token.item()))
            if keep_logits:
                logits_kept.append(logits[0].cpu())
        decode_s = time.perf_counter() - start
        return GenerationResult(prompt_len, tokens, prefill_s, decode_s, self.compiled, logits_kept)

    def _run_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        try:
            return self._step(token, position)
        except Exception as err:  # noqa: BLE001 - compilation failed (no compiler, unsupported op …)
            if not self.compiled:
                raise
            warnings.warn(f"lowbit: compiling the decode step failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly", stacklevel=3)
            self._step, self.compiled = self._eager_step, False
            return self._step(token, position)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *,
                  compile: bool = True, stop_at_eos: bool = True) -> tuple[str, GenerationResult]:
    """Greedy continuation of ``prompt``: (decoded new text, the GenerationResult)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise LowbitError("the prompt encodes to no tokens")
    gen = Generator(model, max_cache_len=ids.shape[1] + max_new_tokens, compile=compile)
    if gen.compiled and max_new_tokens > 1:
        gen.generate(ids, 2)  # compile the decode step outside the timed generation
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    result = gen.generate(ids, max_new_tokens, eos_token_id=eos)
    return tokenizer.decode(result.tokens, skip_special_tokens=True), result
