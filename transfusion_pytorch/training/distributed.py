"""Process-group setup for one process or many under `torchrun`, nccl on CUDA and gloo on CPU.

`torchrun --nproc_per_node N script.py` sets RANK, LOCAL_RANK and WORLD_SIZE; without them
the run is a single process and no process group is made.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen = True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Joins the process group when launched by torchrun (a no-op for a single process).
    `device`: 'cuda' or 'cpu', default CUDA when available; the backend follows it
    (nccl for CUDA, gloo for CPU) unless given."""
    device_type = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))

    device = torch.device(device_type, local_rank) if device_type == 'cuda' else torch.device(device_type)
    if device.type == 'cuda':
        torch.cuda.set_device(device)

    if world_size > 1 and not dist.is_initialized():
        backend = backend or ('nccl' if device.type == 'cuda' else 'gloo')
        dist.init_process_group(backend, device_id = device if device.type == 'cuda' else None)

    return DistInfo(rank, local_rank, world_size, device)


def teardown():
    """Leaves the process group once every rank is here: a rank that destroyed it while another
    still used it (writing its results) aborted at times under gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    return sum_across_ranks(value) / (dist.get_world_size() if dist.is_initialized() else 1)


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


@contextmanager
def torch_threads(threads: int):
    """torch's CPU threads set to `threads` (0: left as they are) inside, restored after: a job
    runs with its config's `threads` without changing the caller's setting."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
