"""Generation speed: prefill tokens/s, decode tokens/s and peak memory, with a fixed protocol.

Protocol (also stated in ``lowbit eval --help``): a prompt of ``prompt_tokens`` (default 128)
deterministic pseudo-random token ids is prefilled eagerly, then ``new_tokens`` (default 128) tokens
are decoded greedily through :class:`lowbit.generate.Generator` (static KV cache, compiled decode
step unless ``compile=False``). One untimed warm-up generation first (it triggers compilation and
kernel preparation); then ``repeats`` timed runs, reporting the median of each rate.

Peak memory is the process's peak resident set size during the timed runs on CPU (Linux: the peak
counter is reset through ``/proc/self/clear_refs`` first, so model loading does not count, but the
resident model does), and ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.generate import Generator
from lowbit.memory import peak_rss

PROMPT_TOKENS = 128
NEW_TOKENS = 128


@dataclass
class SpeedReport:
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    compiled: bool
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speed(model: nn.Module, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS,
                  repeats: int = 3, compile: bool = True, seed: int = 0) -> SpeedReport:
    """Time greedy generation of ``model`` per the protocol in this module's docstring."""
    vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(
        model.get_output_embeddings(), "weight") else int(model.config.vocab_size)
    gen = Generator(model, max_cache_len=prompt_tokens + new_tokens, compile=compile)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    gen.generate(ids, min(new_tokens, 4))  # warm-up: compile, prepare kernels, fill caches
    _reset_peak(gen.device)
    prefill, decode = [], []
    for _ in range(max(1, repeats)):
        result = gen.generate(ids, new_tokens)
        prefill.append(result.prefill_tokens_per_s)
        decode.append(result.decode_tokens_per_s)
    return SpeedReport(prompt_tokens, new_tokens, statistics.median(prefill), statistics.median(decode),
                       _peak_bytes(gen.device), gen.compiled, str(gen.device))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak RSS (VmHWM) counter
            fh.write("5")
    except OSError:
        pass


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = peak_rss()
    if peak is not None:
        return peak
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
