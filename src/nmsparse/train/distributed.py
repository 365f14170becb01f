"""Process-group set-up for ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA) and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "wait_for_all", "all_reduce_sum", "broadcast_masks"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str, backend: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but CUDA is not available")
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen)
    return DistInfo(rank, world, local_rank, torch_device)


def wait_for_all() -> None:
    """Block until every rank reaches this point (no-op single-process). Called at the end of a run so
    no rank closes the process group while rank 0 still writes the export: rank 0 hosts the rendezvous
    store, and a rank whose peer had gone aborted at exit (SIGABRT, seen in the two-process test)."""
    if dist.is_initialized():
        dist.barrier()


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_masks(sparsifier) -> None:
    """Make every rank hold rank 0's masks (they are computed from identical weights, this guarantees it)."""
    if not dist.is_initialized() or sparsifier is None:
        return
    for layer in sparsifier.layers.values():
        dist.broadcast(layer.parametrization.keep, src=0)
