"""Helpers for the trainer tests, and a script the resume/DDP tests run in subprocesses.

    python tests/test_train_support.py run DATA.safetensors OUT_DIR RESULT.safetensors [--steps N] [--batch B] ...

trains the tiny model below on DATA (written by :func:`save_train_data`, so the subprocess needs no
tokenizer) — inside ``torchrun`` too — and writes its trainable parameters to RESULT on rank 0.
No tests live here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from functools import lru_cache
from typing import Any

import torch

TRAINABLE = ("lm_head.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight")


def tiny_llama(seed: int = 0, trainable: tuple[str, ...] = TRAINABLE) -> torch.nn.Module:
    """A 2-layer hidden-64 Llama with random weights; only ``trainable`` parameters need grad."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


class MiniLM(torch.nn.Module):
    """A torch-only causal LM (frozen embedding, trainable mixer + head) for subprocess tests: no
    transformers import, so the process starts in a second."""

    def __init__(self, seed: int = 0, vocab: int = 4096, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim).requires_grad_(False)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from types import SimpleNamespace

        x = self.embed(input_ids)  # [B, S, D]
        x = x + torch.tanh(self.mix(x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]))
        return SimpleNamespace(logits=self.head(x))  # [B, S, V]


def make_model(kind: str) -> torch.nn.Module:
    return MiniLM() if kind == "mini" else tiny_llama()


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from lowbit.models.resolve import builtin_dir

    return AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))


@lru_cache(maxsize=4)
def text_data(seq_len: int = 32) -> Any:
    """(train, eval) windows of the built-in eval text."""
    from lowbit.models.resolve import builtin_dir
    from lowbit.train import load_causal_lm_data, split_eval

    data = load_causal_lm_data(builtin_dir("tiny-lm") / "eval.txt", tokenizer(), seq_len)
    return split_eval(data, 32, seed=0)


def save_train_data(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(text_data()[0].tensors, str(path))
    return path


def reference_config(**kw: Any) -> Any:
    """The config the subprocess runs use (single process here: pass the global batch size)."""
    from lowbit.train import TrainConfig

    return TrainConfig(**dict(dict(lr=1e-2, seed=3, show_progress=False, log_every=1, plot=False), **kw))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Sleep:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        time.sleep(self.seconds)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("data")
    parser.add_argument("out_dir")
    parser.add_argument("result")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--model", choices=["llama", "mini"], default="llama")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    from lowbit.train import TokenDataset, Trainer
    from lowbit.train.distributed import init_distributed, shutdown

    train = TokenDataset(load_file(args.data))
    model = make_model(args.model)
    config = reference_config(steps=args.steps, batch_size=args.batch, grad_accum=args.accum, out_dir=args.out_dir,
                              checkpoint_every=args.checkpoint_every, resume=args.resume, optimizer=args.optimizer)
    Trainer(model, config, train, callbacks=[Sleep(args.sleep)]).train()
    if init_distributed().is_main:
        save_file(trainable_state(model), args.result)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
