"""A lean greedy decode loop: static KV cache, one compiled decode step, the model's own forward.

The model is any Hugging Face causal LM (float or quantized by lowbit) used unchanged: the loop
calls its ``forward`` with a transformers ``StaticCache`` and explicit ``cache_position``s, so every
decode step has the same shapes and the same tensor addresses. That lets ``torch.compile`` turn the
step into one graph (Inductor C++ on CPU; CUDA graphs on GPU via ``mode="reduce-overhead"``), which
removes the per-token Python/dispatch overhead that dominates small and mid-sized models.

Compilation happens on the first decode step (seconds to a minute, once per Generator; Inductor
caches the result on disk); when it is unavailable (no C++ compiler, an unsupported op) the loop
warns once and runs eagerly. Greedy tokens from the compiled loop equal eager greedy decoding
(tested); logits agree to float rounding.

On CPU, float matmuls of the decode step (the LM head; every layer of a float model) are compiled
as parallel reductions instead of ATen's single-threaded one-row GEMM
(:mod:`lowbit.kernels.inductor_gemv`). Per-token overhead, which bounds small models, is cut twice
more:
- models under ``CPP_WRAPPER_MAX_PARAMS`` parameters compile with Inductor's C++ wrapper, so the
  step's ~50 kernel and custom-op calls are made from C++ instead of Python (demo model: ~+15 %
  tokens/s); lowbit's CPU kernels are called there through their C shims
  (:data:`lowbit.kernels.cpu_lowbit.ops.C_SHIMS`), not the boxed dispatcher. Larger models keep the Python wrapper: their token time is dominated by weight reads
  and the C++ wrapper's compile time grows steeply with depth (1 B Llama: ~200 s instead of ~40 s).
- on CPU the compiled decode step uses transformers' "eager" attention (matmul, softmax, matmul),
  which Inductor fuses with its neighbours, instead of SDPA, which stays one opaque ATen call per
  layer (demo model: ~15 % less time per token, float and quantized alike). The prompt's prefill
  keeps the model's own attention; the switch is undone after each generation.
- after the first decode step of a generation, which goes through Dynamo and its guards, the
  remaining steps call the graph that step ran directly, with the new token in place of the old
  one (:mod:`lowbit.graph_replay`; CPU): Dynamo's per-call lookup, guards and input gathering
  (~50 µs a token) are skipped. Between steps of one generation only the token and the position
  *values* change, never a shape, dtype, module or parameter. Where the step is not exactly one
  graph of that token (a graph break …), the steps still go through Dynamo but skip re-evaluating
  its guards (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), which cannot fail there.
  Demo model: fp32 ~3.1k → ~3.8k tokens/s, int4 ~4.2k → ~5.8k.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.graph_replay import RecordingBackend, replay_after
from lowbit.kernels.dispatch import prepare_model

# Every Generator compiles the same method (one code object): by default Dynamo keeps all their
# graphs in one cache and stops compiling after 8 (``recompile_limit``), so a process holding
# several models (a benchmark, an eval sweep) fell back to eager. Each Generator gets its own cache
# where torch.compile offers that (``isolate_recompiles``, newer torch).
_ISOLATED: dict[str, Any] = ({"isolate_recompiles": True}
                             if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {})

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Below this many parameters a CPU decode step compiles with Inductor's C++ wrapper (see above).
CPP_WRAPPER_MAX_PARAMS = 200_000_000


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
        cpp_wrapper: CPU only: compile with Inductor's C++ wrapper (``True``), its Python wrapper
            (``False``) or decide by model size (``None``: below ``CPP_WRAPPER_MAX_PARAMS``). A
            C++-wrapper compilation that fails falls back to the Python wrapper, then to eager.
        decode_attention: the transformers attention implementation decode steps run with
            (``"eager"``, ``"sdpa"`` …); ``None``: ``"eager"`` for a compiled CPU step (see the
            module docstring), else the model's own.
    """

    def __init__(self, model: nn.Module, max_cache_len: int = 512, compile: bool = True,
                 cpp_wrapper: bool | None = None, decode_attention: str | None = None) -> None:
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
        self._eager_step: StepFn = self._forward_step
        self._step = self._eager_step
        self._fallbacks: list[tuple[StepFn, RecordingBackend]] = []
        self._backend: RecordingBackend | None = None  # records the CPU graphs, for replaying them
        self.replayed_steps = 0  # decode steps that called the compiled graph directly (graph_replay)
        self.compiled = False
        self.cpp_wrapper = False
        if decode_attention is None and compile and self.device.type == "cpu":
            decode_attention = "eager"
        self.decode_attention: str | None = decode_attention
        if compile:
            if self.device.type == "cuda":
                self._step = torch.compile(self._forward_step, mode="reduce-overhead", dynamic=False,
                                           **_ISOLATED)
            else:
                if cpp_wrapper is None:
                    cpp_wrapper = sum(p.numel() for p in model.parameters()) < CPP_WRAPPER_MAX_PARAMS
                from lowbit.kernels.inductor_gemv import OneRowMatmulPass

                options: dict[str, Any] = {"post_grad_custom_pre_pass": OneRowMatmulPass()}
                python_step = self._compile(options)
                if cpp_wrapper:
                    self._fallbacks.append(python_step)
                    self._step, self._backend = self._compile(
                        {**options, "cpp_wrapper": True, "aot_inductor.custom_ops_to_c_shims": _c_shims()})
                else:
                    self._step, self._backend = python_step
                self.cpp_wrapper = bool(cpp_wrapper)
            self.compiled = True

    def _compile(self, options: dict[str, Any]) -> tuple[StepFn, RecordingBackend]:
        """The decode step compiled by Inductor with ``options``, through a backend that records its graph."""
        backend = RecordingBackend(options)
        return torch.compile(self._forward_step, dynamic=False, backend=backend, **_ISOLATED), backend

    def _forward_last(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.cache, cache_position=cache_position,
                         use_cache=True)
        return out.logits[:, -1, :].float()

    def _forward_step(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: (greedy next token [1, 1], float32 logits [1, vocab]). The argmax runs
        inside the compiled step, fused with the LM head's output, not as a separate eager call."""
        logits = self._forward_last(input_ids, cache_position)
        return logits.argmax(dim=-1, keepdim=True), logits

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
        extra = virtual_tokens(self.model)
        if prompt_len + max_new_tokens + extra > self.max_cache_len:
            raise LowbitError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + virtual tokens ({extra}) "
                              f"exceeds the cache length {self.max_cache_len}")
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
        with _attention_implementation(self.model, self.decode_attention):
            self._decode(token, tokens, position, prompt_len, max_new_tokens, eos_token_id,
                         logits_kept if keep_logits else None)
        decode_s = time.perf_counter() - start
        return GenerationResult(prompt_len, tokens, prefill_s, decode_s, self.compiled, logits_kept)

    def _decode(self, token: torch.Tensor, tokens: list[int], position: torch.Tensor, prompt_len: int,
                max_new_tokens: int, eos_token_id: int | None, logits_kept: list[torch.Tensor] | None) -> None:
        def keep(token: torch.Tensor, logits: torch.Tensor) -> bool:
            """Record a step's token (and logits); whether to go on."""
            tokens.append(int(token.item()))
            if logits_kept is not None:
                logits_kept.append(logits[0].cpu())
            return eos_token_id is None or tokens[-1] != eos_token_id

        steps = max_new_tokens - 1
        if steps < 1 or (eos_token_id is not None and tokens[-1] == eos_token_id):
            return
        # The first step goes through Dynamo and its guards (it may compile). Later steps of this
        # generation differ from it only in the token fed in: they call its graph directly where
        # that is safe (graph_replay), else they skip the guards (module docstring).
        backend = self._backend
        counts = backend.call_counts() if backend is not None else []
        position.fill_(prompt_len)
        token_in = token
        token, logits = self._run_step(token, position)
        replay = None
        if backend is not None and backend is self._backend:  # no fallback happened in that step
            replay = replay_after(backend, counts, token_in, (token, logits))
        if not keep(token, logits):
            return
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if self.compiled else nullcontext():
            for i in range(1, steps):
                position.fill_(prompt_len + i)
                if replay is not None:
                    token, logits = replay(token)
                    self.replayed_steps += 1
                else:
                    token, logits = self._run_step(token, position)
                if not keep(token, logits):
                    break

    def _run_step(self, token: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            try:
                return self._step(token, position)
            except Exception as err:  # noqa: BLE001 - compilation failed (no compiler, unsupported op …)
                if not self.compiled:
                    raise
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                if self._fallbacks:  # the C++ wrapper failed: try Inductor's Python wrapper
                    warnings.warn(f"lowbit: compiling the decode step with the C++ wrapper failed ({reason}); "
                                  "retrying with the Python wrapper", stacklevel=3)
                    (self._step, self._backend), self.cpp_wrapper = self._fallbacks.pop(), False
                    continue
                warnings.warn(f"lowbit: compiling the decode step failed ({reason}); decoding eagerly", stacklevel=3)
                self._step, self._backend, self.compiled = self._eager_step, None, False


@contextmanager
def _attention_implementation(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block the transformers model runs attention with ``name`` (None: unchanged)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if name is None or name == previous:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _c_shims() -> dict[Any, list[str]]:
    """C shims of lowbit's CPU ops, for the C++ wrapper (none when the kernels are not built)."""
    try:
        from lowbit.kernels.cpu_lowbit.ops import C_SHIMS
    except Exception:  # noqa: BLE001 - no compiler …: the model then has no lowbit CPU ops either
        return {}
    return dict(C_SHIMS)


def virtual_tokens(model: nn.Module) -> int:
    """Cache positions a prompt/prefix-tuning adapter adds in front of the prompt (0 without one)."""
    if getattr(model, "lowbit_prompt_learning", None) is None:
        return 0
    from lowbit.peft.prompt import virtual_tokens as count

    return count(model)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *,
                  compile: bool = True, stop_at_eos: bool = True) -> tuple[str, GenerationResult]:
    """Greedy continuation of ``prompt``: (decoded new text, the GenerationResult)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise LowbitError("the prompt encodes to no tokens")
    gen = Generator(model, max_cache_len=ids.shape[1] + max_new_tokens + virtual_tokens(model), compile=compile)
    if gen.compiled and max_new_tokens > 1:
        gen.generate(ids, 2)  # compile the decode step outside the timed generation
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    result = gen.generate(ids, max_new_tokens, eos_token_id=eos)
    return tokenizer.decode(result.tokens, skip_special_tokens=True), result
