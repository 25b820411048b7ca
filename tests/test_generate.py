"""The compiled decode loop: greedy tokens equal eager decoding; CLI generate / eval --speed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.generate import Generator

PROMPT = torch.tensor([[12, 845, 93, 1207, 5, 388, 2011, 64, 9, 3001, 77, 415]])
NEW = 24
# Compiled (Inductor) and eager float ops round differently (≈1e-6); logits of the demo model are O(10).
# The CPU low-bit kernels quantize decode activations to int8, where such a difference can move one
# activation code by one step and the difference then travels through the KV cache: their logits agree
# to a looser bound (max 0.25, mean 0.05; logits are O(3–10)); the tokens must still be equal.
LOGIT_ATOL = {"fp32": 1e-3, "int8": 0.25, "int4g128": 0.25}


@pytest.fixture(scope="module")
def tiny_lm() -> torch.nn.Module:
    return lowbit.load("builtin:tiny-lm")


def test_eager_static_loop_equals_transformers_generate(tiny_lm: torch.nn.Module) -> None:
    ours = Generator(tiny_lm, max_cache_len=64, compile=False).generate(PROMPT, NEW)
    with torch.no_grad():
        ref = tiny_lm.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert ours.tokens == ref[0, PROMPT.shape[1]:].tolist()
    assert not ours.compiled


@pytest.mark.parametrize("spec", [None, QuantSpec.int_(8, None), QuantSpec.int_(4, 128, symmetric=False)],
                         ids=["fp32", "int8", "int4g128"])
def test_compiled_greedy_equals_eager(tiny_lm: torch.nn.Module, spec: QuantSpec | None) -> None:
    model = tiny_lm if spec is None else lowbit.quantize(_copy(tiny_lm), spec)
    eager = Generator(model, max_cache_len=64, compile=False).generate(PROMPT, NEW, keep_logits=True)
    gen = Generator(model, max_cache_len=64, compile=True)
    compiled = gen.generate(PROMPT, NEW, keep_logits=True)
    assert compiled.compiled, "torch.compile fell back to eager on this machine"
    assert gen.replayed_steps == NEW - 2  # every decode step after the first called the graph directly
    assert compiled.tokens == eager.tokens
    atol = LOGIT_ATOL["fp32" if spec is None else ("int8" if spec.bits == 8 else "int4g128")]
    for a, b in zip(compiled.logits, eager.logits):
        assert torch.allclose(a, b, atol=atol, rtol=0), float((a - b).abs().max())
        assert float((a - b).abs().mean()) < min(atol, 0.05)


def test_decode_attention_is_switched_only_during_decoding(tiny_lm: torch.nn.Module) -> None:
    """A compiled CPU decode step runs eager attention; the model's own setting is restored after."""
    original = tiny_lm.config._attn_implementation
    gen = Generator(tiny_lm, max_cache_len=64, compile=True)
    assert gen.decode_attention == "eager"
    seen: list[str] = []
    step = gen._step
    gen._step = lambda token, position: (seen.append(tiny_lm.config._attn_implementation), step(token, position))[1]
    gen.generate(PROMPT, 4)
    assert seen == ["eager"]  # the first decode step compiles the graph the later steps replay
    assert gen.replayed_steps == 2
    assert tiny_lm.config._attn_implementation == original
    assert Generator(tiny_lm, max_cache_len=64, compile=False).decode_attention is None


def test_python_wrapper_and_reused_generator_equal_eager(tiny_lm: torch.nn.Module) -> None:
    """The Python-wrapper compilation (large models) also equals eager; a Generator reused for a longer
    prompt re-checks Dynamo's guards on its first step, so skipping them afterwards stays correct."""
    model = lowbit.quantize(_copy(tiny_lm), QuantSpec.int_(4, 128, symmetric=False))
    gen = Generator(model, max_cache_len=64, compile=True, cpp_wrapper=False)
    assert not gen.cpp_wrapper
    eager = Generator(model, max_cache_len=64, compile=False)
    for prompt in (PROMPT, torch.cat([PROMPT, PROMPT[:, :5]], dim=1)):
        ours = gen.generate(prompt, NEW)
        assert ours.compiled
        assert ours.tokens == eager.generate(prompt, NEW).tokens
    assert gen.replayed_steps == 2 * (NEW - 2)


def test_replayed_steps_see_weights_replaced_between_generations(tiny_lm: torch.nn.Module) -> None:
    """Each generation's first step goes through Dynamo and records the inputs the later steps replay,
    so a parameter object replaced between generations (same shape: no recompilation) is used."""
    model = _copy(tiny_lm)
    gen = Generator(model, max_cache_len=64, compile=True)
    before = gen.generate(PROMPT, NEW).tokens
    norm = model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * torch.linspace(0.2, 3.0, norm.weight.numel()),
                                     requires_grad=False)
    after = gen.generate(PROMPT, NEW)
    assert after.tokens == Generator(model, max_cache_len=64, compile=False).generate(PROMPT, NEW).tokens
    assert after.tokens != before and gen.replayed_steps == 2 * (NEW - 2)


def test_generators_do_not_share_dynamos_recompile_limit(tiny_lm: torch.nn.Module) -> None:
    """Every Generator compiles the same method; each keeps its own Dynamo cache, so a process with
    several models does not run into the recompile limit (8 by default; 1 here) and fall to eager."""
    from lowbit.generate import _ISOLATED

    if not _ISOLATED:
        pytest.skip("this torch has no torch.compile(isolate_recompiles=...)")
    models = (tiny_lm, lowbit.quantize(_copy(tiny_lm), QuantSpec.int_(8, None)))
    # torch's config.patch, not monkeypatch.setattr, whose undo deletes the option from the config
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowbit: compiling")  # no fallback to eager
        for model in models:
            gen = Generator(model, max_cache_len=64, compile=True)
            assert gen.generate(PROMPT, 4).compiled and gen.replayed_steps == 2


def test_replay_is_refused_when_the_step_is_not_one_graph_of_the_token() -> None:
    from lowbit.graph_replay import RecordingBackend, replay_after

    def run(fn, token: torch.Tensor):  # type: ignore[no-untyped-def]
        backend = RecordingBackend({})
        compiled = torch.compile(fn, backend=backend, dynamic=False)
        compiled(token)  # compile
        counts = backend.call_counts()
        return replay_after(backend, counts, token, compiled(token))

    token = torch.tensor([[3]])
    one_graph = run(lambda t: ((t + 1) * 2, (t * 1.5).float()), token)
    assert one_graph is not None and one_graph(torch.tensor([[5]]))[0].item() == 12

    def with_break(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = t + 1
        torch._dynamo.graph_break()
        return u * 2, (u * 1.5).float()

    assert run(with_break, token) is None  # two graphs
    assert run(lambda t: (t, t.float()), token) is None  # an output that is not the graph's (the input)
    assert run(lambda t: (torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 4)), token) is None  # token unused
    assert run(lambda t: ((t + 1) * 2,), token) is None  # not (token, logits)


def test_failed_cpp_wrapper_compile_falls_back(tiny_lm: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = Generator(tiny_lm, max_cache_len=64, compile=True, cpp_wrapper=True)
    assert gen.cpp_wrapper

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("C++ compiler crashed")

    monkeypatch.setattr(gen, "_step", broken)
    with pytest.warns(UserWarning, match="retrying with the Python wrapper"):
        out = gen.generate(PROMPT, NEW)
    assert out.compiled and not gen.cpp_wrapper
    assert out.tokens == Generator(tiny_lm, max_cache_len=64, compile=False).generate(PROMPT, NEW).tokens
    monkeypatch.setattr(gen, "_step", broken)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = gen.generate(PROMPT, 4)
    assert not out.compiled


def test_generator_input_errors(tiny_lm: torch.nn.Module) -> None:
    gen = Generator(tiny_lm, max_cache_len=16, compile=False)
    with pytest.raises(LowbitError, match="exceeds the cache"):
        gen.generate(PROMPT, 8)
    with pytest.raises(LowbitError, match="empty"):
        gen.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(LowbitError, match="one prompt"):
        gen.generate(torch.zeros(2, 3, dtype=torch.long), 2)


def test_cli_generate_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "builtin:tiny-lm", "--prompt", "The interpreter", "--max-new-tokens", "8",
                 "--no-compile", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(out["text"], str) and out["text"]
    assert len(out["tokens"]) == 8 and out["decode_tokens_per_s"] > 0


def test_cli_eval_speed_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "builtin:tiny-lm", "--speed", "--no-compile", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"):
        assert out[key] > 0, key
    assert out["speed_prompt_tokens"] == 128 and out["speed_new_tokens"] == 128


def test_cli_generate_rejects_encoder(minilm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(minilm), "--prompt", "hi", "--no-compile"]) == 2
    assert "causal language model" in capsys.readouterr().err


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
