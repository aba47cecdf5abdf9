"""torchrun / DistributedDataParallel plumbing: one process per device, gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1; each rank takes CUDA device LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world == 1:
        return Dist(0, 1, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when not distributed)."""
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


@torch.no_grad()
def average_gradients(params, d: Dist) -> None:
    """Average the gradients of ``params`` over ranks, in place: for trainable tensors outside the
    DDP-wrapped model (a method's own, e.g. L2P's prompts), whose gradients DDP does not reduce. A
    rank whose step left a tensor without gradient contributes zeros."""
    if d.world == 1:
        return
    for p in (p for p in params if p.requires_grad):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(d.world)


@torch.no_grad()
def check_in_sync(model: torch.nn.Module, d: Dist, extra=()) -> None:
    """Raise if the ranks' copies of ``model`` (and the ``extra`` tensors: a method's own parameters)
    differ (DDP and ``average_gradients`` keep them equal; a mismatch is a bug)."""
    if d.world == 1:
        return
    mine = torch.stack([p.detach().double().sum() for p in (*model.parameters(), *extra)])  # (n_params,)
    mine = mine.to(d.device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    if not torch.allclose(mine, ref, rtol=1e-6, atol=1e-8):
        raise RuntimeError(f"rank {d.rank}: model or method parameters differ from rank 0's")


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
