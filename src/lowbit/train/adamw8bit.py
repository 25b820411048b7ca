"""AdamW whose two moments are stored block-wise quantized to 8 bits (about 4x less optimizer memory).

Per parameter of ``n`` elements, the state is (flattened, padded to a multiple of ``BLOCK`` = 256):

- ``exp_avg_q``    ``[ceil(n/256)*256]`` int8  — first moment m, signed absmax: m ≈ q / 127 · scale
- ``exp_avg_scale`` ``[ceil(n/256)]`` float32 — per-block absmax of m
- ``exp_avg_sq_q`` ``[ceil(n/256)*256]`` uint8 — **sqrt** of the second moment, absmax: √v ≈ q / 255 · scale
- ``exp_avg_sq_scale`` ``[ceil(n/256)]`` float32 — per-block max of √v
- ``step`` scalar float32 tensor

Why √v: v spans the square of the gradients' range, so linear 8-bit codes of v would round most of
a block to zero; √v has half the (log) range, and it is the quantity the update divides by. A
non-zero √v is never stored as code 0 (it is rounded up to 1), so a tiny second moment cannot turn
into a division by ``eps`` on a later step. Each step dequantizes both moments to float32, applies
the ordinary AdamW update with them (the current gradient enters at full precision), and
re-quantizes. 2 + 8/256 bytes per element instead of 8 for float32 AdamW. Deterministic (no
stochastic rounding), so seeded runs and resumed runs are bit-identical.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

BLOCK = 256


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """Flatten and zero-pad ``x`` to ``[n_blocks, BLOCK]`` float32."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` → (int8 codes ``[n_blocks*BLOCK]``, absmax ``[n_blocks]``)."""
    b = _blocks(x)
    scale = b.abs().amax(dim=1)
    q = torch.round(b / scale.clamp_min(1e-30)[:, None] * 127).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1), scale


def dequantize_signed(q: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    x = q.view(-1, BLOCK).float() * (scale[:, None] / 127)
    return x.reshape(-1)[: like.numel()].view_as(like)


def quantize_sqrt(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative ``v`` → (uint8 codes of √v ``[n_blocks*BLOCK]``, max √v ``[n_blocks]``)."""
    s = _blocks(v).clamp_min(0).sqrt()
    scale = s.amax(dim=1)
    q = torch.round(s / scale.clamp_min(1e-30)[:, None] * 255)
    q = torch.where(s > 0, q.clamp(1, 255), torch.zeros_like(q)).to(torch.uint8)
    return q.reshape(-1), scale


def dequantize_sqrt(q: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = q.view(-1, BLOCK).float() * (scale[:, None] / 255)
    return s.square().reshape(-1)[: like.numel()].view_as(like)


class AdamW8bit(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with 8-bit block-quantized moments (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    m = torch.zeros_like(grad)
                    v = torch.zeros_like(grad)
                    state["step"] = torch.tensor(0.0)
                else:
                    m = dequantize_signed(state["exp_avg_q"], state["exp_avg_scale"], grad)
                    v = dequantize_sqrt(state["exp_avg_sq_q"], state["exp_avg_sq_scale"], grad)
                state["step"] += 1
                t = float(state["step"])
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1**t)) / denom
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
                state["exp_avg_q"], state["exp_avg_scale"] = quantize_signed(m)
                state["exp_avg_sq_q"], state["exp_avg_sq_scale"] = quantize_sqrt(v)
        return loss


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))

