"""Distribution and the training-speed transforms, applied from outside the model in one place,
in the order of torchtitan's `parallelize.py` (activation checkpointing, then compile, then
FSDP; https://github.com/pytorch/torchtitan):

1. the modality encoders and decoders are frozen: training sends no gradient to them (the
   encoder runs under `no_grad`, the decoder not at all), and frozen parameters keep DDP and
   FSDP from waiting for gradients that never come;
2. the model (and its EMA) move to the device;
3. activation checkpointing (`activation_checkpointing`), per transformer block, with
   `checkpoint_wrapper` (non-reentrant `torch.utils.checkpoint`): a checkpointed block keeps
   only its input for the backward pass and runs its forward again there.
   - 'full': every block;
   - 'selective': every other block (the 2nd, 4th, ...), torchtitan's per-layer selective
     checkpointing, for about half the recomputation of 'full'; it frees less than half of
     what 'full' frees, as the peak comes with a recomputed block on top (on the first model
     of docs/usage.md: 17% of the gradients and activations against 47%, for +11% against +29%
     compute; `benchmarks/memory.py`). Per-layer rather than per-op (a policy that keeps matmul
     outputs and recomputes the rest): our blocks already keep little besides their matmuls'
     inputs and outputs (RMSNorm, adaLN modulation and SwiGLU save only their inputs, see
     `norms.py` and `transformer.py`), so a per-op policy would have little left to free;
4. `torch.compile` of each transformer block (`compile_backend`), as torchtitan does: the
   blocks are where the time goes, they share one graph, and the packing, masks and losses
   around them stay eager (they work on Python lists and change shape with every batch). So
   that batches of changing length do not compile a graph each, the packed sequence is padded
   up to the token budget (`pad_to_multiple`, see `masks.py`): every batch of a run reaches
   the blocks with one length. The number of modality spans, which changes too, is marked
   dynamic; a batch without any modality is a second graph. Compiled in place
   (`Module.compile`), so parameter names and checkpoints do not change;
5. one of
   - 'ddp' (default): `DistributedDataParallel` with `find_unused_parameters=True`. A batch
     need not use every parameter: a modality type absent from it leaves its projections
     unused, and a text-only batch leaves the time conditioning unused; ranks may differ;
   - 'fsdp': FSDP2, `fully_shard` on each transformer block, then on the whole model (the
     embeddings, projections and heads). With bf16 on, the mixed-precision policy gathers
     parameters in bf16 for the forward and backward passes and reduces gradients in fp32
     (`MixedPrecisionPolicy(param_dtype = bf16, reduce_dtype = fp32)`; the sharded
     parameters, the optimizer and the EMA stay fp32); the model's inputs are not cast, so
     the data and the flow-matching targets keep their precision.
     `set_reduce_scatter_unused_params(True)` is the FSDP counterpart of
     `find_unused_parameters`: ranks reduce-scatter zeros for the parameters their batch did
     not use, so the collectives match. The EMA copy is sharded the same way (in fp32), so
     each rank averages only its own shards.

Frozen weights (a frozen language model, `freeze_text_weights`) may share an FSDP2 unit with
trainable ones: FSDP2 shards each parameter on its own and reduce-scatters only the gradients
that exist, so no grouping by requires_grad is needed (tests/test_language_models_distributed.py).

With one process, steps 3 and 4 apply and nothing is wrapped for distribution.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..masks import padded_length
from .distributed import DistInfo

STRATEGIES = ('ddp', 'fsdp')
CHECKPOINTING = (None, 'selective', 'full')
TOKEN_MULTIPLE = 128    # compiled blocks see the token budget rounded up to this (flex attention's block size)


def freeze_codecs(model: nn.Module):
    for module in (*model.modality_encoders, *model.modality_decoders):
        module.requires_grad_(False)


def apply_activation_checkpointing(model: nn.Module, mode: str | None):
    """Wraps the blocks that `mode` checkpoints (see the module docstring)."""
    blocks = model.transformer.blocks
    for index, block in enumerate(blocks):
        if mode == 'full' or (mode == 'selective' and index % 2 == 1):
            blocks[index] = checkpoint_wrapper(block, checkpoint_impl = CheckpointImpl.NO_REENTRANT)


def apply_compile(model: nn.Module, backend: str = 'inductor', max_tokens: int | None = None):
    """Compiles each transformer block in place, and pads every batch's packed sequence to
    `max_tokens` rounded up to a multiple of TOKEN_MULTIPLE (without `max_tokens`: each batch to
    its own length so rounded), so that a run compiles one graph for all of its batches."""
    model.pad_to_multiple = padded_length(max_tokens, TOKEN_MULTIPLE) if max_tokens is not None else TOKEN_MULTIPLE
    for block in model.transformer.blocks:
        block.compile(backend = backend, fullgraph = True)


def shard(model: nn.Module, mesh, mp_policy: MixedPrecisionPolicy | None = None):
    block_policy = dict(mp_policy = mp_policy) if mp_policy is not None else {}
    # the root takes the user's samples as they are (the latents are also the flow-matching targets)
    root_policy = dict(mp_policy = MixedPrecisionPolicy(mp_policy.param_dtype, mp_policy.reduce_dtype, cast_forward_inputs = False)) \
        if mp_policy is not None else {}
    for block in model.transformer.blocks:
        fully_shard(block, mesh = mesh, **block_policy)
    fully_shard(model, mesh = mesh, **root_policy)
    model.set_reduce_scatter_unused_params(True)


def parallelize(
    model: nn.Module,
    ema: nn.Module | None,
    dist_info: DistInfo,
    strategy: str = 'ddp',
    *,
    activation_checkpointing: str | None = None,
    compile_backend: str | None = None,
    max_tokens: int | None = None,
    bf16: bool = False,
) -> nn.Module:
    """Returns the module to call for training: `model` itself, or its DDP wrapper. The
    checkpointing, compile and FSDP sharding change `model` (and `ema.module`) in place.
    `compile_backend`: None (eager) or a `torch.compile` backend; `max_tokens`: the token budget
    of a batch, to which compiled runs pad; `bf16`: FSDP's mixed-precision policy."""
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f'activation_checkpointing must be one of {CHECKPOINTING}, got {activation_checkpointing!r}')

    if activation_checkpointing is not None and compile_backend is not None and model.config.transformer.use_value_residual:
        raise ValueError('activation_checkpointing with compile does not support transformer.use_value_residual: the first block '
                         'hands its values to the others, a side effect that torch.compile cannot checkpoint. Use one or the other')

    freeze_codecs(model)
    model.to(dist_info.device)
    if ema is not None:
        ema.to(dist_info.device)

    apply_activation_checkpointing(model, activation_checkpointing)
    if compile_backend is not None:
        apply_compile(model, compile_backend, max_tokens)

    if not dist_info.is_distributed:
        return model

    if strategy == 'ddp':
        device_ids = [dist_info.device.index] if dist_info.device.type == 'cuda' else None
        return DistributedDataParallel(model, device_ids = device_ids, find_unused_parameters = True)

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    shard(model, mesh, MixedPrecisionPolicy(param_dtype = torch.bfloat16, reduce_dtype = torch.float32) if bf16 else None)
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
