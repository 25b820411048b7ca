"""Random-weight Hugging Face Llama checkpoints of any size, written shard by shard.

For benchmarks and memory tests: the model is never held in memory (one layer at a time), so a
multi-GB checkpoint can be made on a small machine. The result loads with transformers as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.io.writer import ShardWriter, atomic_output_dir, write_json


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        return {
            "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        }

    def num_params(self) -> int:
        per_layer = sum(_numel(s) for s in self.layer_shapes().values())
        emb = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float32", "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_random_llama(out: str | Path, shape: LlamaShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int = 1 << 30) -> Path:
    """Write a random-weight Llama checkpoint (config.json + sharded safetensors) to ``out``."""
    gen = torch.Generator().manual_seed(seed)
    std = shape.hidden_size ** -0.5

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen) * std).to(dtype)

    with atomic_output_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        writer.add("model.embed_tokens.weight", rand(shape.vocab_size, shape.hidden_size))
        for layer in range(shape.num_hidden_layers):
            for name, dims in shape.layer_shapes().items():
                tensor = torch.ones(dims, dtype=dtype) if "norm" in name else rand(*dims)
                writer.add(f"model.layers.{layer}.{name}", tensor)
        writer.add("model.norm.weight", torch.ones(shape.hidden_size, dtype=dtype))
        if not shape.tie_word_embeddings:
            writer.add("lm_head.weight", rand(shape.vocab_size, shape.hidden_size))
        writer.finish()
        config = shape.config()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
    return Path(out)


@torch.no_grad()
def inject_activation_outliers(model: torch.nn.Module, *, channels: int = 4, factor: float = 30.0, seed: int = 0,
                               vocab_size: int | None = None) -> dict[str, list[int]]:
    """Give ``model`` activation-outlier channels without changing its function.

    In every block, for each norm whose output feeds only linear layers, ``channels`` random
    channels of the norm are multiplied by ``factor`` and the matching input columns of its
    consumers divided by it — the outlier pattern of large LLMs that breaks per-tensor int8
    activations. Returns {norm name: [channels]}.
    """
    from lowbit.algorithms.calibrate import capture_block_inputs, find_blocks
    from lowbit.algorithms.smoothing import fold_into_norm, foldable_pairs

    prefix, blocks = find_blocks(model)
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, vocab, (1, 32), generator=gen)}
    inputs = capture_block_inputs(model, blocks, [batch], device)
    chosen: dict[str, list[int]] = {}
    hidden = inputs.hidden[0]
    for index, block in enumerate(blocks):
        def run(block: torch.nn.Module = block, hidden: torch.Tensor = hidden) -> torch.Tensor:
            return block(hidden, *inputs.args[0], **inputs.kwargs[0])

        for norm_name, consumers in foldable_pairs(block, run).items():
            norm = block.get_submodule(norm_name)
            dim = norm.weight.shape[0]
            picked = torch.randperm(dim, generator=gen)[:channels]
            scale = torch.ones(dim)
            scale[picked] = 1.0 / factor  # fold divides the norm by s: × factor there
            fold_into_norm(norm, [block.get_submodule(n) for n in consumers], scale.to(norm.weight.device))
            chosen[f"{prefix}.{index}.{norm_name}"] = sorted(picked.tolist())
        out = run()
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return chosen
