"""AdaLoRA (Zhang et al. 2023) on any linear base, in Hugging Face peft's format, budget schedule included.

Each targeted layer holds an SVD-shaped update: ``lora_A`` [r, in] (right vectors), ``lora_E`` [r, 1]
(singular values), ``lora_B`` [out, r] (left vectors), and

    y = base(x) + dropout(x) @ (A·E)ᵀ @ Bᵀ · scaling / (ranknum + 1e-5)

with ``scaling = lora_alpha`` and ``ranknum = init_r`` (peft keeps the starting rank there even
after pruning). Training prunes triplets (Aᵢ, Eᵢ, Bᵢ) by importance to reach ``target_r`` per layer
on average: :class:`AdaLoraScheduler` is that schedule, run by lowbit's trainer through two
callbacks — no user code calls an update step. A pruned triplet is masked in ``E`` while training;
the saved file drops it, as peft's does, and the config's ``rank_pattern`` ({"<module>.lora_E":
[keep?] × init_r}) lets peft (and lowbit) rebuild the smaller layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft.base import AdapterLayer, LayerAdapter, adapter_layers, check_rank
from lowbit.peft.config import AdapterConfig, check_scaling
from lowbit.peft.model import LayerMethod, register_method
from lowbit.tensor import all_finite


@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA settings, with Hugging Face peft's field names.

    The schedule has three phases over ``total_step`` optimizer steps: ``tinit`` warm-up steps at
    the full ``init_r``; a budgeting phase where the total rank falls on a cubic curve towards
    ``target_r × layers`` (re-allocated every ``deltaT`` steps); ``tfinal`` last steps with the final
    ranks fixed.

    Attributes:
        init_r: starting rank of every layer. target_r: the average final rank (≤ init_r).
        beta1, beta2: EMA factors of the importance (sensitivity) and its uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality regulariser ‖AAᵀ − I‖ + ‖BᵀB − I‖ (≥ 0).
        total_step: number of optimizer steps of the run (required).
        rank_pattern: the pruned ranks, {"<module>.lora_E": [bool] × init_r}; set by training, read
            from a saved adapter (the layers are then built at the kept rank).
        lora_alpha: the scaling numerator (``scaling = lora_alpha``; ≤ 0: the layer's rank, as peft).
        target_modules / exclude_modules / modules_to_save / bias: as in :class:`LoraConfig`.
        init_lora_weights: ``True``: E = 0, A and B ~ N(0, 0.02²) (starts as the base); ``False``:
            all random (for tests).
        r, fan_in_fan_out: peft's LoRA fields, accepted and unused (``init_r`` sets the rank).
    """

    peft_type = "ADALORA"
    peft_ignored: ClassVar[dict[str, Any]] = {"use_rslora": False, "use_dora": False, "alpha_pattern": {},
                                              "loftq_config": {}}
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    exclude_modules: Any = None
    bias: str = "none"
    init_lora_weights: bool = True
    modules_to_save: Any = None
    fan_in_fan_out: bool = False
    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        own = "AdaLoraConfig"
        check_scaling(own, "lora_alpha", self.lora_alpha)
        for key in ("init_r", "target_r", "deltaT"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSpecError(f"{own}.{key} must be a positive integer, got {value!r}")
        for key in ("tinit", "tfinal"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSpecError(f"{own}.{key} must be a non-negative integer, got {value!r}")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise InvalidSpecError(f"{own}.total_step is required: the number of optimizer steps of the run "
                                   f"(a positive integer), got {self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise InvalidSpecError(f"{own}: tinit={self.tinit} must be < total_step - tfinal = "
                                   f"{self.total_step} - {self.tfinal}; the schedule leaves no budgeting phase")
        if self.target_r > self.init_r:
            raise InvalidSpecError(f"{own}.target_r={self.target_r} must be ≤ init_r={self.init_r}")
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise InvalidSpecError(f"{own}.{key} must be in (0, 1), got {getattr(self, key)!r}")
        if self.orth_reg_weight < 0:
            raise InvalidSpecError(f"{own}.orth_reg_weight must be ≥ 0, got {self.orth_reg_weight!r}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidSpecError(f"{own}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise InvalidSpecError(f"{own}.init_lora_weights must be True or False, got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise InvalidSpecError(f"{own}.rank_pattern must be a dict {{'<module>.lora_E': [bool, …]}}")
            for key, mask in self.rank_pattern.items():
                if not isinstance(mask, (list, tuple)) or len(mask) != self.init_r:
                    raise InvalidSpecError(f"{own}.rank_pattern[{key!r}] must list init_r={self.init_r} keep flags, "
                                           f"got {mask!r}")
            self.rank_pattern = {k: [bool(v) for v in mask] for k, mask in self.rank_pattern.items()}

    @property
    def final_step(self) -> int:
        """peft's ``global_step`` (0-based) at which the ranks are fixed: ``total_step - tfinal``, or the
        last step ``total_step - 1`` when tfinal is 0 (so that a run of total_step steps ends at target_r)."""
        assert self.total_step is not None
        return min(self.total_step - self.tfinal, self.total_step - 1)

    def pattern_for(self, module_name: str, adapter_name: str = "default") -> list[bool] | None:
        if not self.rank_pattern:
            return None
        for key in (f"{module_name}.lora_E", f"{module_name}.lora_E.{adapter_name}"):
            if key in self.rank_pattern:
                return list(self.rank_pattern[key])
        return None


class AdaLoraAdapter(LayerAdapter):
    """One SVD-form update: ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r] (float32).

    ``rank_pattern`` ([bool] × init_r, or None) is peft's record of which triplets survive; when it
    has as many entries as the adapter has rows, the saved tensors keep only the surviving rows.
    """

    def __init__(self, in_features: int, out_features: int, r: int, ranknum: int, lora_alpha: float,
                 dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        self.r = r
        self.lora_A = nn.Parameter(torch.randn(r, in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r))
        self.register_buffer("ranknum", torch.tensor([float(ranknum)]), persistent=False)
        self.scaling = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank_pattern: list[bool] | None = None
        if init_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def update_output(self, x: torch.Tensor, y: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        """y [..., out] + dropout(x) [..., in] @ (A·E)ᵀ [in, r] @ Bᵀ [r, out] · scaling / (ranknum + 1e-5)."""
        xd = self.dropout(x if torch.is_autocast_enabled() else x.to(self.lora_A.dtype))
        delta = (xd @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] (float32)."""
        a, e, b = self.lora_A.detach().float(), self.lora_E.detach().float(), self.lora_B.detach().float()
        return (b @ (a * e)) * self.scaling / (self.ranknum.float() + 1e-5)

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None,
               layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta_weight().to(weight.device), bias

    def kept_rank(self) -> int:
        """Triplets still in use: the rank pattern's count, else the rows with a non-zero E."""
        if self.rank_pattern is not None:
            return sum(self.rank_pattern)
        return int((self.lora_E.detach() != 0).sum())

    # ---- peft's file ----------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        a, e, b = self.lora_A.detach(), self.lora_E.detach(), self.lora_B.detach()
        pattern = self.rank_pattern
        if pattern is not None and len(pattern) == a.shape[0] and sum(pattern) != a.shape[0]:
            keep = torch.tensor(pattern, dtype=torch.bool, device=a.device)  # peft saves the kept rows only
            a, e, b = a[keep], e[keep], b[:, keep]
        return {"lora_A": a, "lora_B": b, "lora_E": e}

    def peft_tensor(self, suffix: str) -> torch.Tensor | None:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}.get(suffix)


def make_adalora(layer: AdapterLayer, config: AdaLoraConfig, adapter_name: str, module_name: str) -> AdaLoraAdapter:
    pattern = config.pattern_for(module_name, adapter_name)
    r = config.init_r if pattern is None else sum(pattern)
    check_rank(module_name, config.init_r, layer.in_features, layer.out_features, "init_r")  # before allocating
    adapter = AdaLoraAdapter(layer.in_features, layer.out_features, r, config.init_r, config.lora_alpha,
                             config.lora_dropout, config.init_lora_weights)
    adapter.rank_pattern = pattern
    return adapter


class _AdaLoraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(make_adalora)

    def inject(self, model: nn.Module, config: Any, name: str) -> list[str]:
        if config.rank_pattern:
            names = {f"{m}.lora_E" for m in self.targets(model, config)}
            stray = sorted(k for k in config.rank_pattern if k not in names and k.rsplit(".", 1)[0] not in names)
            if stray:
                raise InvalidSpecError(f"AdaLoraConfig.rank_pattern names layers that are not targeted: "
                                       f"{', '.join(stray[:5])}")
        return super().inject(model, config, name)

    def saved_config(self, model: nn.Module, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """The file's ``rank_pattern`` is the adapters' own (peft re-sizes the layers by it on load)."""
        patterns = {f"{module_name}.lora_E": list(adapter.rank_pattern)
                    for module_name, adapter in _adalora_adapters(model, name).items()
                    if adapter.rank_pattern is not None}
        data["rank_pattern"] = patterns or None
        return data


def _adalora_adapters(model: nn.Module, name: str) -> dict[str, AdaLoraAdapter]:
    return {module_name: layer.adapters[name] for module_name, layer in sorted(adapter_layers(model).items())
            if name in layer.adapters and isinstance(layer.adapters[name], AdaLoraAdapter)}


register_method("ADALORA", _AdaLoraMethod())


# ---- the budget schedule -----------------------------------------------------------------
class AdaLoraScheduler:
    """AdaLoRA's rank allocation (peft's ``RankAllocator`` + ``update_and_allocate``) as trainer callbacks.

    lowbit's trainer calls, for each optimizer step ``step`` (numbered from 1, as the trainer does;
    peft's ``global_step`` is ``step - 1``):

    * ``extra_loss(model, step)`` — added to the loss before backward: ``orth_reg_weight`` × the
      mean over A and B matrices of ‖PPᵀ − I‖_F (A) / ‖PᵀP − I‖_F (B);
    * ``after_optimizer_step(model, step)`` — after ``optimizer.step()``, before ``zero_grad()``:
      updates the importance EMAs from |p · grad|, masks the least important triplets in E down to
      the cubic budget (every ``deltaT`` steps between ``tinit`` and ``total_step - tfinal``), fixes
      the final ``rank_pattern`` at ``config.final_step`` and keeps it applied afterwards.

    The state lives in this object (``state_dict`` / ``load_state_dict`` for checkpoints).
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        from lowbit.peft.model import adapter_config

        config = adapter_config(model, adapter_name)
        if not isinstance(config, AdaLoraConfig):
            raise InvalidSpecError(f"adapter {adapter_name!r} is {config.peft_type}, not ADALORA")
        self.config = config
        self.adapter_name = adapter_name
        self.adapters = _adalora_adapters(model, adapter_name)
        if not self.adapters:
            raise LowbitError(f"adapter {adapter_name!r}: no AdaLoRA layers in this model")
        shrunk = [m for m, a in self.adapters.items() if a.lora_A.shape[0] != config.init_r]
        if shrunk:
            raise LowbitError(f"adapter {adapter_name!r}: layer {shrunk[0]} was loaded already pruned (rank "
                              f"{self.adapters[shrunk[0]].lora_A.shape[0]} < init_r={config.init_r}); a new AdaLoRA "
                              "schedule needs a fresh adapter")
        self.init_budget = sum(a.lora_A.shape[0] for a in self.adapters.values())
        self.target_budget = config.target_r * len(self.adapters)
        self.finalized = False
        self.reset_importance()

    def reset_importance(self) -> None:
        self.ipt_ema: dict[str, torch.Tensor] = {}  # "<module>.lora_A" → EMA of |p·grad| (p's shape)
        self.unc_ema: dict[str, torch.Tensor] = {}  # its uncertainty EMA

    # ---- callbacks ------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """The orthogonality regulariser (a scalar tensor), or None when orth_reg_weight is 0."""
        weight = self.config.orth_reg_weight
        if weight == 0:
            return None
        total: torch.Tensor | None = None
        count = 0
        for adapter in self.adapters.values():
            for p, is_a in ((adapter.lora_A, True), (adapter.lora_B, False)):
                cov = p @ p.T if is_a else p.T @ p  # [r, r]
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                norm = torch.norm(cov - eye, p="fro")
                total = norm if total is None else total + norm
                count += 1
        assert total is not None
        return weight * total / count

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """``step``: the optimizer step just taken, numbered from 1 (lowbit's trainer)."""
        config = self.config
        assert config.total_step is not None
        global_step = step - 1  # peft's numbering
        if global_step < config.total_step - config.tfinal:
            self._update_importance()
        if not self.finalized and global_step >= config.final_step:
            self._finalize()
        elif self.finalized:
            self._apply_patterns()
        else:
            budget, mask = self.budget(global_step)
            if mask:
                self._mask_to_budget(budget)

    # ---- the schedule ---------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed after peft's ``global_step`` = ``step - 1``, whether to re-allocate now):
        peft's cubic schedule."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (coeff ** 3) + self.target_budget)
        return budget, step % c.deltaT == 0

    def kept_ranks(self) -> dict[str, int]:
        return {m: a.kept_rank() for m, a in self.adapters.items()}

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for module_name, adapter in self.adapters.items():
            for suffix, p in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B), ("lora_E", adapter.lora_E)):
                if p.grad is None:
                    continue
                key = f"{module_name}.{suffix}"
                ipt = (p * p.grad).abs().detach()
                ema = self.ipt_ema.get(key, torch.zeros_like(p))
                unc = self.unc_ema.get(key, torch.zeros_like(p))
                ema = b1 * ema + (1 - b1) * ipt  # sensitivity smoothing
                self.ipt_ema[key] = ema
                self.unc_ema[key] = b2 * unc + (1 - b2) * (ipt - ema).abs()  # uncertainty

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module: importance of each triplet [r]}: s(E) + mean s(A row) + mean s(B column)."""
        scores = {}
        for module_name, adapter in self.adapters.items():
            def score(suffix: str, p: torch.Tensor) -> torch.Tensor:
                key = f"{module_name}.{suffix}"
                if key not in self.ipt_ema:
                    return torch.zeros_like(p)
                return self.ipt_ema[key] * self.unc_ema[key]
            s_a = torch.mean(score("lora_A", adapter.lora_A), dim=1, keepdim=True)  # [r, 1]
            s_b = torch.mean(score("lora_B", adapter.lora_B), dim=0, keepdim=False).view(-1, 1)  # [r, 1]
            s_e = score("lora_E", adapter.lora_E)  # [r, 1]
            scores[module_name] = s_e.view(-1) + torch.cat([s_a, s_b], dim=1).sum(dim=1).view(-1)
        return scores

    def _mask_to_budget(self, budget: int) -> None:
        k = self.init_budget - budget
        if k < 1:
            return
        scores = self._triplet_scores()
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k=k)[0].item()
        for module_name, adapter in self.adapters.items():
            drop = (scores[module_name] <= threshold).view(-1, 1)
            adapter.lora_E.masked_fill_(drop, 0.0)
            adapter.rank_pattern = (~drop).view(-1).tolist()
        self._publish()

    def _finalize(self) -> None:
        if self.ipt_ema:
            self._mask_to_budget(self.target_budget)
        else:  # resumed past the budgeting phase without importance: the kept rows are the final pattern
            for adapter in self.adapters.values():
                if adapter.rank_pattern is None:
                    adapter.rank_pattern = (adapter.lora_E.detach() != 0).view(-1).tolist()
            self._apply_patterns()
        self.finalized = True
        self.reset_importance()
        self._publish()

    def _apply_patterns(self) -> None:
        for adapter in self.adapters.values():
            if adapter.rank_pattern is not None:
                keep = torch.tensor(adapter.rank_pattern, dtype=torch.bool, device=adapter.lora_E.device)
                adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def _publish(self) -> None:
        """Mirror the adapters' patterns into the config (what ``adapter_config`` and the saved file show)."""
        self.config.rank_pattern = {f"{m}.lora_E": list(a.rank_pattern) for m, a in self.adapters.items()
                                    if a.rank_pattern is not None} or None

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"finalized": self.finalized, "ipt_ema": dict(self.ipt_ema), "unc_ema": dict(self.unc_ema),
                "rank_pattern": {m: a.rank_pattern for m, a in self.adapters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a state that does not fit these adapters raises ValueError
        (the checkpoint reader names the file)."""
        params = {f"{m}.{suffix}": p for m, a in self.adapters.items()
                  for suffix, p in (("lora_A", a.lora_A), ("lora_B", a.lora_B), ("lora_E", a.lora_E))}
        if not isinstance(state.get("finalized"), bool):
            raise ValueError(f"finalized must be true or false, got {state.get('finalized')!r:.40}")
        emas = {}
        for field in ("ipt_ema", "unc_ema"):
            ema = state.get(field)
            if not isinstance(ema, dict):
                raise ValueError(f"{field} must be a mapping")
            for key, value in ema.items():
                if key not in params or not isinstance(value, torch.Tensor) or value.shape != params[key].shape \
                        or not value.is_floating_point() or not all_finite(value):
                    raise ValueError(f"{field}[{key!r:.80}] is not a finite tensor of an adapter parameter's shape")
            emas[field] = dict(ema)
        patterns = state.get("rank_pattern", {})
        if not isinstance(patterns, dict):
            raise ValueError("rank_pattern must be a mapping")
        for module_name, pattern in patterns.items():
            if module_name not in self.adapters:
                continue
            rank = self.adapters[module_name].lora_A.shape[0]
            if pattern is not None and (not isinstance(pattern, list) or len(pattern) != rank
                                        or not all(isinstance(b, bool) for b in pattern)):
                raise ValueError(f"rank_pattern[{module_name!r}] must be {rank} booleans")
        self.finalized = state["finalized"]
        self.ipt_ema, self.unc_ema = emas["ipt_ema"], emas["unc_ema"]
        for module_name, pattern in patterns.items():
            if module_name in self.adapters:
                self.adapters[module_name].rank_pattern = None if pattern is None else list(pattern)
        self._publish()


def adalora_callbacks(model: nn.Module, adapter_name: str = "default") -> list[AdaLoraScheduler]:
    """The trainer callbacks AdaLoRA needs: ``[AdaLoraScheduler]`` when ``adapter_name`` is an
    AdaLoRA adapter, ``[]`` for other methods (so a finetune command can always call this)."""
    from lowbit.peft.model import adapter_config

    config = adapter_config(model, adapter_name)
    if not isinstance(config, AdaLoraConfig):
        return []
    return [AdaLoraScheduler(model, adapter_name)]
