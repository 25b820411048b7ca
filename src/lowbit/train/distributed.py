"""Data-parallel training through ``torch.distributed`` (launched by ``torchrun``; gloo on CPU, nccl on CUDA).

One process per device. Every rank walks the same deterministic global batch order and takes its
own rows of each global micro-batch (rank r: rows ``[r·B, (r+1)·B)``), so 2 ranks with batch B
train like 1 process with batch 2B. The token-mean loss is exact across ranks: each rank divides
its summed loss by the *global* label-token count (all-reduced) and the gradients are summed.

Only the trainable parameters are synchronised (DistributedDataParallel skips frozen ones and is
told to ignore them at start-up, so a large frozen base is never broadcast). FSDP (sharding the
parameters themselves) is not implemented: the trainer targets adapters/QAT on a frozen or
replicated base, where plain DDP is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Join the process group when launched with ``WORLD_SIZE`` > 1 (env:// rendezvous set by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device(ctx: DistContext) -> torch.device:
    """Where collective tensors must live (CUDA for nccl)."""
    if ctx.enabled and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over all ranks (returned on the tensor's own device)."""
    if not ctx.enabled:
        return values
    buf = values.to(comm_device(ctx))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device)


def all_gather(tensor: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order, on the CPU."""
    if not ctx.enabled:
        return [tensor.cpu()]
    buf = tensor.to(comm_device(ctx))
    out = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(out, buf)
    return [t.cpu() for t in out]


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` synchronising only the trainable parameters (frozen base ignored)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    if hasattr(DDP, "_set_params_and_buffers_to_ignore_for_model"):
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [ctx.local_rank] if comm_device(ctx).type == "cuda" else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)
