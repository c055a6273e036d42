"""Distribution, applied from outside the model in one place (after torchtitan's `parallelize.py`).

In order:

1. the modality encoders and decoders are frozen: training sends no gradient to them (the
   encoder runs under `no_grad`, the decoder not at all), and frozen parameters keep DDP and
   FSDP from waiting for gradients that never come;
2. the model (and its EMA) move to the device;
3. one of
   - 'ddp' (default): `DistributedDataParallel` with `find_unused_parameters=True`. A batch
     need not use every parameter: a modality type absent from it leaves its projections
     unused, and a text-only batch leaves the time conditioning unused; ranks may differ;
   - 'fsdp': FSDP2, `fully_shard` on each transformer block, then on the whole model (the
     embeddings, projections and heads). `set_reduce_scatter_unused_params(True)` is the FSDP
     counterpart of `find_unused_parameters`: ranks reduce-scatter zeros for the parameters
     their batch did not use, so the collectives match. The EMA copy is sharded the same
     way, so each rank averages only its own shards.

Frozen weights (a frozen language model, `freeze_text_weights`) may share an FSDP2 unit with
trainable ones: FSDP2 shards each parameter on its own and reduce-scatters only the gradients
that exist, so no grouping by requires_grad is needed (tests/test_language_models_distributed.py).

With one process nothing is wrapped. Activation checkpointing and `torch.compile` are not
applied yet; they would go before step 3, in that order.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .distributed import DistInfo

STRATEGIES = ('ddp', 'fsdp')


def freeze_codecs(model: nn.Module):
    for module in (*model.modality_encoders, *model.modality_decoders):
        module.requires_grad_(False)


def shard(model: nn.Module, mesh):
    for block in model.transformer.blocks:
        fully_shard(block, mesh = mesh)
    fully_shard(model, mesh = mesh)
    model.set_reduce_scatter_unused_params(True)


def parallelize(model: nn.Module, ema: nn.Module | None, dist_info: DistInfo, strategy: str = 'ddp') -> nn.Module:
    """Returns the module to call for training: `model` itself, or its DDP wrapper. With FSDP,
    `model` (and `ema.module`) are sharded in place."""
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')

    freeze_codecs(model)
    model.to(dist_info.device)
    if ema is not None:
        ema.to(dist_info.device)

    if not dist_info.is_distributed:
        return model

    if strategy == 'ddp':
        device_ids = [dist_info.device.index] if dist_info.device.type == 'cuda' else None
        return DistributedDataParallel(model, device_ids = device_ids, find_unused_parameters = True)

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    shard(model, mesh)
    if ema is not None:
        shard(ema.module, mesh)
    return model


@contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool):
    """Skips the gradient all-reduce / reduce-scatter of a micro-batch that is not the last of
    an accumulation: DDP's `no_sync()`, FSDP2's `set_requires_gradient_sync`."""
    if isinstance(wrapped, DistributedDataParallel):
        with nullcontext() if sync else wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield
