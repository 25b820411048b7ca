"""Structured pruning: remove attention heads, MLP neurons and whole decoder blocks → a smaller *dense* model.

Llama-family decoders (Llama, Mistral, Qwen2, Qwen3 …: ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
in every block; q/k/v biases and per-head q_norm/k_norm are handled). Every removed head or neuron is a slice of
rows/columns of the linear layers around it, so the result is an ordinary model of the same architecture with
smaller ``num_attention_heads``/``num_key_value_heads``/``intermediate_size``/``num_hidden_layers``: it saves, loads
(transformers and lowbit), quantizes and exports like any other, and runs faster.

Importance (``importance="activation"``, on calibration data through the shared runner
:func:`lowbit.algorithms.calibrate.run_layer_by_layer`):

* MLP neuron j: ‖a_j‖₂ · ‖W_down[:, j]‖₂ with a_j its activation over the calibration tokens — the norm of the
  neuron's contribution to the block output (Wanda's score summed over a column);
* attention head h: ‖X_h W_o,hᵀ‖_F, its contribution through o_proj over the tokens, √tr(W_o,h G_h W_o,hᵀ) with
  G_h the Gram matrix of the head's slice of o_proj's input; a KV group scores √Σ of its heads' squares;
* decoder block: mean over tokens of 1 − cos(input, output) of the hidden state (ShortGPT's block influence),
  measured with the block's own heads and neurons already removed.

Block i's heads and neurons are removed before block i+1 is measured (sequential, as Wanda/SparseGPT run);
whole blocks go at the end. ``"magnitude"`` needs no data: a head scores ‖W_o,h‖_F·‖W_v,g(h)‖_F, a neuron
‖W_gate,j‖·‖W_up,j‖·‖W_down[:, j]‖ (block removal needs data). ``"random"`` is the baseline to beat.

GQA: the head counts and head_dim are single config fields, so every layer loses the same: whole KV groups
(their KV head and its query heads; preferred where possible — the KV cache shrinks too) or the same number of
query heads from every group. A fraction neither can express is an InvalidSpecError naming those that can; so
is a head count the config class itself refuses (transformers 5's LlamaConfig wants hidden_size to be a multiple
of num_attention_heads even with an explicit head_dim).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, ShapeError, UnsupportedModelError

IMPORTANCE = ("activation", "magnitude", "random")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder block


@dataclass(frozen=True)
class StructuredConfig:
    """What to remove: ``heads`` and ``mlp`` are fractions of every layer's query heads / MLP neurons, ``blocks``
    a number of whole decoder blocks. ``seed`` drives ``importance="random"``."""

    heads: float = 0.0
    mlp: float = 0.0
    blocks: int = 0
    importance: str = "activation"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise InvalidSpecError(f"structured importance {self.importance!r}: choose one of {', '.join(IMPORTANCE)}")
        for name in ("heads", "mlp"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InvalidSpecError(f"structured pruning: {name} must be a fraction in [0, 1), got {value}")
        if int(self.blocks) != self.blocks or self.blocks < 0:
            raise InvalidSpecError(f"structured pruning: blocks must be a whole number ≥ 0, got {self.blocks}")
        if self.heads == 0 and self.mlp == 0 and self.blocks == 0:
            raise InvalidSpecError("structured pruning: nothing to remove (give heads, mlp or blocks)")
        if self.blocks and self.importance == "magnitude":
            raise InvalidSpecError("structured pruning: which blocks to remove is measured on data; use importance "
                                   "'activation' (or 'random') with blocks > 0")

    @property
    def needs_data(self) -> bool:
        return self.importance == "activation"


@dataclass(frozen=True)
class Geometry:
    """The model's attention/MLP shape as its config and layers state it."""

    num_q: int
    num_kv: int
    head_dim: int
    intermediate: int
    layers: int

    @property
    def group(self) -> int:
        return self.num_q // self.num_kv


@dataclass(frozen=True)
class HeadPlan:
    drop_groups: int = 0     # whole KV groups removed in every layer
    drop_per_group: int = 0  # or: query heads removed from every KV group


@dataclass
class LayerRemoval:
    """What one block (original index) lost."""

    heads: list[int] = field(default_factory=list)     # query heads removed
    kv_heads: list[int] = field(default_factory=list)  # KV heads removed
    neurons: list[int] = field(default_factory=list)   # MLP neurons removed
    influence: float | None = None                     # 1 − cos(in, out), measured after its own pruning
    removed: bool = False                              # the whole block went

    def to_dict(self) -> dict[str, Any]:
        return {"heads_removed": self.heads, "kv_heads_removed": self.kv_heads, "neurons_removed": len(self.neurons),
                "block_influence": None if self.influence is None else round(self.influence, 6),
                "block_removed": self.removed}


@dataclass
class StructuredResult:
    config: StructuredConfig
    params_before: int
    params_after: int = 0
    shape_before: dict[str, int] = field(default_factory=dict)
    shape_after: dict[str, int] = field(default_factory=dict)
    layers: dict[int, LayerRemoval] = field(default_factory=dict)
    removed_blocks: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": "structured", "heads": self.config.heads, "mlp": self.config.mlp,
                "blocks": self.config.blocks, "importance": self.config.importance,
                "params_before": self.params_before, "params_after": self.params_after,
                "param_ratio": round(self.param_ratio, 6), "sparsity": round(1 - self.param_ratio, 6),
                "shape_before": self.shape_before, "shape_after": self.shape_after,
                "removed_blocks": self.removed_blocks, "layers_pruned": len(self.layers),
                "seconds": round(self.seconds, 3), "per_layer": {str(i): r.to_dict() for i, r in self.layers.items()}}


# ---- geometry and plans ----------------------------------------------------------------------------------
def _head_options(num_q: int, num_kv: int) -> dict[int, list[HeadPlan]]:
    """Query heads removable uniformly → the plans that remove that many (whole KV groups first)."""
    group = num_q // num_kv
    options: dict[int, list[HeadPlan]] = {0: [HeadPlan()]}
    for r in range(1, num_kv):
        options.setdefault(r * group, []).append(HeadPlan(drop_groups=r))
    for s in range(1, group):
        options.setdefault(s * num_kv, []).append(HeadPlan(drop_per_group=s))
    return dict(sorted(options.items()))


def heads_after(plan: HeadPlan, num_q: int, num_kv: int) -> tuple[int, int]:
    """(query heads, KV heads) left by ``plan``."""
    kv = num_kv - plan.drop_groups
    return kv * (num_q // num_kv - plan.drop_per_group), kv


def achievable_head_fractions(num_q: int, num_kv: int,
                              accepts: Callable[[int, int], str | None] | None = None) -> list[float]:
    """Fractions of query heads that can go uniformly: r whole KV groups, or s query heads of every group
    (and, given ``accepts``, whose result it does not refuse)."""
    return [count / num_q for count, plans in _head_options(num_q, num_kv).items()
            if accepts is None or any(accepts(*heads_after(p, num_q, num_kv)) is None for p in plans)]


def head_plan(fraction: float, num_q: int, num_kv: int,
              accepts: Callable[[int, int], str | None] | None = None) -> HeadPlan:
    """How ``fraction`` of ``num_q`` query heads in ``num_kv`` KV groups goes (whole groups preferred).
    ``accepts(q, kv)`` returns why a resulting head count is refused (the config class's own rules), or None."""
    options = _head_options(num_q, num_kv)
    exact = fraction * num_q
    count = round(exact)
    why = ""
    if abs(exact - count) < 1e-6 and count in options:
        for plan in options[count]:
            refusal = None if accepts is None else accepts(*heads_after(plan, num_q, num_kv))
            if refusal is None:
                return plan
            why = f"{'/'.join(map(str, heads_after(plan, num_q, num_kv)))} query/KV heads are refused ({refusal}); "
    else:
        why = (f"{num_q} query heads in {num_kv} KV groups can only lose whole KV groups or the same number of query "
               "heads from every group; ")
    allowed = ", ".join(f"{100 * f:.4g} %" for f in achievable_head_fractions(num_q, num_kv, accepts))
    raise InvalidSpecError(f"heads={fraction:g}: {why}achievable fractions are {allowed}")


def config_refusal(model: nn.Module) -> Callable[[int, int], str | None]:
    """Whether the model's config class (transformers' own validation) accepts a pruned head count."""
    config = model.config
    base = config.to_dict()
    head_dim = _shape(model)["head_dim"]

    def refusal(num_q: int, num_kv: int) -> str | None:
        try:
            type(config).from_dict({**base, "num_attention_heads": num_q, "num_key_value_heads": num_kv,
                                    "head_dim": head_dim})
        except Exception as exc:  # strict-dataclass validation errors are not all ValueErrors
            return f"{type(config).__name__}: {str(exc).strip().splitlines()[-1].strip()}"
        return None
    return refusal


def _geometry(model: nn.Module, prefix: str, blocks: nn.ModuleList) -> Geometry:
    config = model.config
    num_q = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_q)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_q)
    if num_q % num_kv:
        raise UnsupportedModelError(f"config: num_attention_heads {num_q} is not a multiple of num_key_value_heads "
                                    f"{num_kv}")
    first = blocks[0].mlp.gate_proj if hasattr(blocks[0], "mlp") and hasattr(blocks[0].mlp, "gate_proj") else None
    geo = Geometry(num_q, num_kv, head_dim, first.out_features if isinstance(first, nn.Linear) else -1, len(blocks))
    want = {"q_proj": (None, num_q * head_dim), "k_proj": (None, num_kv * head_dim), "v_proj": (None, num_kv * head_dim),
            "o_proj": (num_q * head_dim, None), "gate_proj": (None, geo.intermediate),
            "up_proj": (None, geo.intermediate), "down_proj": (geo.intermediate, None)}
    for i, block in enumerate(blocks):
        for part, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            for name in names:
                where = f"{prefix}.{i}.{part}.{name}"
                module = getattr(getattr(block, part, None), name, None)
                if type(module) is not nn.Linear:
                    kind = "missing" if module is None else type(module).__name__
                    hint = (" (prune the float model, then quantize)" if kind == "QuantLinear" else
                            "; structured pruning covers Llama-family blocks (self_attn.q/k/v/o_proj, "
                            "mlp.gate/up/down_proj as nn.Linear)")
                    raise UnsupportedModelError(f"{where}: {kind}{hint}")
                n_in, n_out = want[name]
                if (n_in is not None and module.in_features != n_in) or (n_out is not None and
                                                                         module.out_features != n_out):
                    raise ShapeError(f"{where}: weight {module.out_features}×{module.in_features} does not match the "
                                     f"config ({num_q} query / {num_kv} KV heads of {head_dim}, intermediate "
                                     f"{geo.intermediate})")
    return geo


def _shape(model: nn.Module) -> dict[str, int]:
    config = model.config
    heads = int(config.num_attention_heads)
    return {"num_attention_heads": heads, "num_key_value_heads": int(getattr(config, "num_key_value_heads", None)
                                                                     or heads),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            "intermediate_size": int(config.intermediate_size), "num_hidden_layers": int(config.num_hidden_layers)}


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


# ---- importance --------------------------------------------------------------------------------------------
class HeadGram:
    """Per-head Gram matrices of o_proj's input, G_h = Σ_t x_t,h x_t,hᵀ: [num_heads, head_dim, head_dim] float64."""

    def __init__(self, num_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(num_heads, head_dim, head_dim, dtype=torch.float64, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, *self.gram.shape[:2]).to(self.gram.device, torch.float32)  # [T, H, d]
        if not torch.isfinite(x).all():
            raise FloatingPointError("calibration activations contain NaN/Inf")
        self.gram += torch.einsum("thd,the->hde", x, x).double()


def head_scores(o_weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖contribution through o_proj‖ per head: o_weight [D, H·d], gram [H, d, d] → [H]."""
    heads, d, _ = gram.shape
    w = o_weight.detach().double().reshape(-1, heads, d).transpose(0, 1)  # [H, D, d]
    energy = ((w @ gram.to(w.device)) * w).sum((1, 2))
    return energy.clamp(min=0).sqrt()


def neuron_scores(down_weight: torch.Tensor, input_sq: torch.Tensor) -> torch.Tensor:
    """‖a_j‖₂·‖W_down[:, j]‖₂ per neuron: down_weight [D, I], input_sq [I] = Σ_t a_tj² → [I]."""
    return input_sq.double().clamp(min=0).sqrt().to(down_weight.device) * down_weight.detach().double().norm(dim=0)


def _magnitude_scores(block: nn.Module, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    attn, mlp = block.self_attn, block.mlp
    o = attn.o_proj.weight.detach().double().reshape(-1, geo.num_q, geo.head_dim).norm(dim=(0, 2))
    v = attn.v_proj.weight.detach().double().reshape(geo.num_kv, -1).norm(dim=1)
    heads = o * v.repeat_interleave(geo.group)
    neurons = (mlp.gate_proj.weight.detach().double().norm(dim=1) * mlp.up_proj.weight.detach().double().norm(dim=1)
               * mlp.down_proj.weight.detach().double().norm(dim=0))
    return heads, neurons


def _random_scores(geo: Geometry, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    return torch.rand(geo.num_q, generator=g, dtype=torch.float64), torch.rand(geo.intermediate, generator=g,
                                                                               dtype=torch.float64)


class BlockInfluence:
    """Mean over tokens of 1 − cos(block input, block output): how much a block changes the hidden state."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, (tuple, list)) else output
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, L]
        self.total += float((1 - cos).sum())
        self.count += cos.numel()

    @property
    def score(self) -> float:
        return self.total / self.count if self.count else 0.0


# ---- choosing and cutting ------------------------------------------------------------------------------------
def choose_heads(scores: torch.Tensor, geo: Geometry, plan: HeadPlan) -> tuple[list[int], list[int]]:
    """(query heads kept, KV heads kept), in order, from per-query-head scores [num_q]."""
    per_group = scores.reshape(geo.num_kv, geo.group)
    if plan.drop_groups:
        drop = set(torch.topk(per_group.pow(2).sum(1), plan.drop_groups, largest=False).indices.tolist())
        keep_kv = [i for i in range(geo.num_kv) if i not in drop]
        return [i * geo.group + j for i in keep_kv for j in range(geo.group)], keep_kv
    if plan.drop_per_group:
        drop_in = torch.topk(per_group, plan.drop_per_group, dim=1, largest=False).indices.tolist()
        keep_q = [i * geo.group + j for i in range(geo.num_kv) for j in range(geo.group) if j not in drop_in[i]]
        return keep_q, list(range(geo.num_kv))
    return list(range(geo.num_q)), list(range(geo.num_kv))


def _head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return (torch.tensor(heads, device=device).unsqueeze(1) * head_dim + torch.arange(head_dim, device=device)).flatten()


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding ``linear``'s weight [rows, cols] (bias [rows]); dtype, device and grad flag kept."""
    w = linear.weight.detach()
    w = w if rows is None else w.index_select(0, rows.to(w.device))
    w = w if cols is None else w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        b = linear.bias.detach()
        b = b if rows is None else b.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(b.contiguous().clone(), requires_grad=linear.bias.requires_grad)
    return new


def cut_attention(attn: nn.Module, keep_q: list[int], keep_kv: list[int], head_dim: int) -> None:
    """Keep only the given query/KV heads of one attention module (q_norm/k_norm act per head_dim: unchanged)."""
    device = attn.q_proj.weight.device
    q_rows, kv_rows = _head_rows(keep_q, head_dim, device), _head_rows(keep_kv, head_dim, device)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = len(keep_q) // len(keep_kv)
    for attr, value in (("num_heads", len(keep_q)), ("num_attention_heads", len(keep_q)),
                        ("num_key_value_heads", len(keep_kv))):
        if isinstance(getattr(attn, attr, None), int):  # older transformers keep these on the module
            setattr(attn, attr, value)


def cut_mlp(mlp: nn.Module, keep: list[int]) -> None:
    """Keep only the given neurons: rows of gate/up, columns of down."""
    index = torch.tensor(keep, device=mlp.gate_proj.weight.device)
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=index)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=index)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=index)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(keep)


def _prune_block(block: nn.Module, geo: Geometry, plan: HeadPlan, mlp_drop: int, head_score: torch.Tensor | None,
                 neuron_score: torch.Tensor | None) -> LayerRemoval:
    removal = LayerRemoval()
    if head_score is not None and (plan.drop_groups or plan.drop_per_group):
        keep_q, keep_kv = choose_heads(head_score.cpu(), geo, plan)
        cut_attention(block.self_attn, keep_q, keep_kv, geo.head_dim)
        removal.heads = sorted(set(range(geo.num_q)) - set(keep_q))
        removal.kv_heads = sorted(set(range(geo.num_kv)) - set(keep_kv))
    if neuron_score is not None and mlp_drop:
        drop = torch.topk(neuron_score.cpu(), mlp_drop, largest=False).indices.sort().values.tolist()
        cut_mlp(block.mlp, sorted(set(range(geo.intermediate)) - set(drop)))
        removal.neurons = drop
    return removal


def remove_blocks(model: nn.Module, blocks: nn.ModuleList, drop: list[int]) -> None:
    """Delete decoder blocks; renumber the rest (``layer_idx`` indexes the KV cache) and the per-layer config lists."""
    for index in sorted(drop, reverse=True):
        del blocks[index]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    old = int(config.num_hidden_layers)
    for key in PER_LAYER_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == old:
            setattr(config, key, [v for i, v in enumerate(value) if i not in drop])
    config.num_hidden_layers = len(blocks)


# ---- the whole model ------------------------------------------------------------------------------------------
def prune_structured(model: nn.Module, config: StructuredConfig, *, tokenizer: Any = None, calib: Any = None,
                     device: str | torch.device = "cpu", show_progress: bool = False,
                     batch_size: int = 8) -> StructuredResult:
    """Remove heads, MLP neurons and blocks of ``model`` in place (smaller nn.Linear layers, ``model.config``
    updated); ``calib`` is a CalibConfig (activation importance; default the built-in corpus)."""
    from lowbit.algorithms.calibrate import find_blocks

    start = time.perf_counter()
    prefix, blocks = find_blocks(model)
    geo = _geometry(model, prefix, blocks)
    plan = head_plan(config.heads, geo.num_q, geo.num_kv, config_refusal(model) if config.heads else None)
    mlp_drop = round(config.mlp * geo.intermediate)
    if config.mlp and not 0 < mlp_drop < geo.intermediate:
        raise InvalidSpecError(f"mlp={config.mlp:g}: removes {mlp_drop} of {geo.intermediate} neurons per layer; "
                               f"the step is 1/{geo.intermediate}")
    if config.blocks >= geo.layers:
        raise InvalidSpecError(f"blocks={config.blocks}: the model has {geo.layers} blocks; at least one must stay")
    result = StructuredResult(config, count_params(model), shape_before=_shape(model))
    if config.needs_data:
        influence = _prune_on_data(model, prefix, blocks, geo, plan, mlp_drop, config, result, tokenizer, calib,
                                   device, show_progress, batch_size)
    else:
        from lowbit.progress import progress

        influence = {}
        for index in progress(range(geo.layers), desc="prune", enabled=show_progress, unit="block"):
            block = blocks[index]
            scores = (_magnitude_scores(block, geo) if config.importance == "magnitude"
                      else _random_scores(geo, config.seed, index))
            result.layers[index] = _prune_block(block, geo, plan, mlp_drop, *scores)
        if config.blocks:  # random
            g = torch.Generator().manual_seed(config.seed)
            influence = dict(enumerate(torch.rand(geo.layers, generator=g).tolist()))
    if config.blocks:
        drop = sorted(sorted(influence, key=lambda i: influence[i])[:config.blocks])
        remove_blocks(model, blocks, drop)
        result.removed_blocks = drop
        for index in drop:
            result.layers[index].removed = True
    _update_config(model, geo, plan, mlp_drop)
    history = list(getattr(model.config, "lowbit_pruning", None) or [])
    model.config.lowbit_pruning = [*history, _provenance(config, calib, result.removed_blocks)]
    result.params_after = count_params(model)
    result.shape_after = _shape(model)
    result.seconds = time.perf_counter() - start
    return result


def _prune_on_data(model: nn.Module, prefix: str, blocks: nn.ModuleList, geo: Geometry, plan: HeadPlan,
                   mlp_drop: int, config: StructuredConfig, result: StructuredResult, tokenizer: Any, calib: Any,
                   device: str | torch.device, show_progress: bool, batch_size: int) -> dict[int, float]:
    """Measure and cut block by block on the calibration runner; returns each block's influence."""
    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
    from lowbit.algorithms.calibrate import run_layer_by_layer
    from lowbit.compress.prune import InputSquares

    if tokenizer is None:
        from lowbit.quantize import load_tokenizer

        tokenizer = load_tokenizer(model)
    ids = calibration_batches(tokenizer, calib or CalibConfig())
    batches = [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
               for i in range(0, ids.shape[0], batch_size)]
    heads_on, mlp_on = bool(plan.drop_groups or plan.drop_per_group), bool(mlp_drop)
    targets = {f"{prefix}.{i}.{name}": None for i in range(geo.layers)
               for name, on in (("self_attn.o_proj", heads_on), ("mlp.down_proj", mlp_on)) if on}

    def make_stats(name: str, module: nn.Module) -> Any:
        if name.endswith("o_proj"):
            return HeadGram(geo.num_q, geo.head_dim, device)
        return InputSquares(module.in_features, device)

    influence = {i: BlockInfluence() for i in range(geo.layers)}

    def prepare_block(block: nn.Module, block_prefix: str, jobs: dict[str, Any], run: Any) -> None:
        index = int(block_prefix.rstrip(".").rsplit(".", 1)[1])
        influence[index].reset()  # measured again on the pruned block's pass that feeds the next block
        o, down = jobs.get("self_attn.o_proj"), jobs.get("mlp.down_proj")
        head_score = None if o is None else head_scores(block.self_attn.o_proj.weight, o.stats.gram)
        neuron_score = None if down is None else neuron_scores(block.mlp.down_proj.weight, down.stats.sq)
        result.layers[index] = _prune_block(block, geo, plan, mlp_drop, head_score, neuron_score)

    handles = [b.register_forward_hook(influence[i].hook, with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run_layer_by_layer(model, batches, targets=targets, make_stats=make_stats,
                           replace=lambda job: model.get_submodule(job.name), device=device,
                           prepare_block=prepare_block, show_progress=show_progress)
    finally:
        for handle in handles:
            handle.remove()
    for index, removal in result.layers.items():
        removal.influence = influence[index].score
    return {i: b.score for i, b in influence.items()}


def _update_config(model: nn.Module, geo: Geometry, plan: HeadPlan, mlp_drop: int) -> None:
    config = model.config
    config.num_attention_heads, config.num_key_value_heads = heads_after(plan, geo.num_q, geo.num_kv)
    config.head_dim = geo.head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
    config.intermediate_size = geo.intermediate - mlp_drop


def _provenance(config: StructuredConfig, calib: Any, removed: list[int]) -> dict[str, Any]:
    from lowbit import __version__

    record: dict[str, Any] = {"method": "structured", **asdict(config), "removed_blocks": removed,
                              "lowbit_version": __version__}
    if config.needs_data:
        from lowbit.algorithms.calib_data import CalibConfig

        record["calibration"] = asdict(calib or CalibConfig())
    return record
