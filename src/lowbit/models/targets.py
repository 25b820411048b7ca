"""Which modules are linear layers, and which of them a recipe quantizes."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.build import output_head_name, tied_parameter_names
from lowbit.nn.quant_linear import QuantLinear
from lowbit.recipe import QuantRecipe
from lowbit.formats.spec import QuantSpec


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight [in, out])."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear)) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or QuantLinear."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return int(module.in_features), int(module.out_features)


def float_weight(module: nn.Module) -> "torch.Tensor":
    """Weight [out, in] of an nn.Linear or transformers Conv1D (Conv1D stores [in, out])."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_linear(m)}


# Methods that may quantize a tied output head: they change only the head's own (untied) weight.
# The activation methods rescale weights (SmoothQuant) and would rescale the shared embedding too.
UNTIE_METHODS = ("rtn", "hqq", "gptq", "awq")


def select_targets(model: nn.Module, recipe: QuantRecipe) -> dict[str, QuantSpec]:
    """{module name: spec} of the float linear layers ``recipe`` quantizes.

    A layer whose weight is tied to another parameter (an lm_head sharing the input embedding) is
    quantized only when a layer override names it explicitly (``--layer-bits lm_head=8``): it is then
    untied, the embedding keeping its float weight and the head getting its own quantized copy (as
    llama.cpp stores ``output.weight``), see :func:`untie_quantized_head`. A skip list that merely
    leaves the head out never unties it.
    """
    from lowbit.errors import InvalidSpecError

    tied_modules = {t.rsplit(".", 1)[0] for t in tied_parameter_names(model)}
    targets = {}
    for name, module in linear_modules(model).items():
        if isinstance(module, QuantLinear):
            continue
        if name in tied_modules:
            override = recipe.override_for(name)
            if override is None or override.spec is None:
                continue
            if recipe.method not in UNTIE_METHODS:
                raise InvalidSpecError(f"{name}: its weight is tied to the input embedding; method {recipe.method!r} "
                                       f"would change the embedding too. Quantize it with one of "
                                       f"{', '.join(UNTIE_METHODS)}, or leave it in float")
        spec = recipe.spec_for(name)
        if spec is not None:
            targets[name] = spec
    return targets


def tied_target_sources(model: nn.Module, targets: dict[str, QuantSpec]) -> dict[str, str]:
    """{target module name: the parameter its weight is tied to} for targets that are tied layers."""
    modules = {target.rsplit(".", 1)[0]: source for target, source in tied_parameter_names(model).items()}
    return {name: source for name, source in modules.items() if name in targets}


def untie_quantized_head(model: nn.Module) -> bool:
    """Mark the config untied when the (tied) output head has been replaced by a quantized layer.

    The input embedding keeps its float weight; saving then writes both, and loading builds them
    apart. Returns whether the model was untied.
    """
    config = getattr(model, "config", None)
    get = getattr(model, "get_output_embeddings", None)
    if config is None or get is None or not getattr(config, "tie_word_embeddings", False):
        return False
    if not isinstance(get(), QuantLinear):
        return False
    config.tie_word_embeddings = False
    return True


def share_quantized_head(model: nn.Module) -> dict[str, str]:
    """Make the input embedding read its rows from the (tied) output head once that head is quantized.

    The recipe option ``tied_head: share``: the model then stores the matrix once, quantized (as
    llama.cpp stores a tied ``token_embd``), instead of a float embedding beside a quantized head.
    Returns {embedding module name: head module name} (empty when the model has no quantized tied head).
    """
    from lowbit.nn.quant_embedding import SharedQuantEmbedding

    config = getattr(model, "config", None)
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if config is None or get_out is None or get_in is None or not getattr(config, "tie_word_embeddings", False):
        return {}
    head, embedding = get_out(), get_in()
    if not isinstance(head, QuantLinear) or isinstance(embedding, SharedQuantEmbedding):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    emb_name, head_name = names[id(embedding)], names[id(head)]
    dtype = embedding.weight.dtype if isinstance(getattr(embedding, "weight", None), torch.Tensor) else torch.float32
    set_submodule(model, emb_name, SharedQuantEmbedding(head, getattr(embedding, "padding_idx", None), dtype))
    config.tie_word_embeddings = False  # nothing for transformers to re-tie: the embedding has no weight of its own
    return {emb_name: head_name}


def shared_embeddings(model: nn.Module) -> dict[str, str]:
    """{embedding module name: head module name} of the model's :class:`SharedQuantEmbedding` modules."""
    from lowbit.nn.quant_embedding import SharedQuantEmbedding

    names = {id(m): n for n, m in model.named_modules()}
    return {name: names[id(m.head)] for name, m in model.named_modules()
            if isinstance(m, SharedQuantEmbedding) and id(m.head) in names}


def counted_linear_names(model: nn.Module) -> list[str]:
    """Linear layers counted in ``bits_per_weight``: every linear layer except the output head."""
    head = output_head_name(model)
    return [n for n in linear_modules(model) if n != head]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_target_shapes(model: nn.Module, targets: dict[str, QuantSpec]) -> None:
    """Fail before any work if a spec's group size does not divide a target layer's input dimension."""
    from lowbit.errors import ShapeError

    for name, spec in targets.items():
        in_features, out_features = linear_dims(model.get_submodule(name))
        if spec.granularity == "group" and in_features % spec.group_size:
            raise ShapeError(f"{name}: group_size {spec.group_size} does not divide the input dimension {in_features} "
                             f"(weight {out_features}×{in_features}); choose a group size that divides {in_features}, "
                             "or skip this layer")
