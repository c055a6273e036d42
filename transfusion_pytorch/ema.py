"""An exponential moving average of a model's weights, for sampling and evaluation.

The first `update()` copies the weights; each later one moves every parameter a fraction
`1 - beta` towards the online model's (`lerp_`), and copies the buffers. Under FSDP the
averaged copy is sharded like the online model (see `training/parallelize.py`), so each rank
averages only its own shards. (`torch.optim.swa_utils.AveragedModel` does the same, but its
grouped foreach update mixes plain tensors and FSDP's DTensors and fails.)

Parameters that are frozen when the EMA is made (a frozen language model, LMFusion's recipe)
never change, so their average is themselves: the averaged model shares them with the online
model instead of holding a copy, which for a frozen 8B LM saves 16 GB or more. The averaged
model is still complete (its `state_dict()` and `save_pretrained` hold every weight). Under
FSDP each model shards its own reference to them, so there the EMA does hold its 1 / world
share. A training checkpoint saves the shared ones once, under the model (`EMA.shared` names
them; `training/checkpoint.py`). A shared parameter that is unfrozen later would no longer be averaged: `update()`
refuses that (make a new EMA after unfreezing).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, beta: float = 0.99):
        super().__init__()
        if not 0. <= beta < 1.:
            raise ValueError(f'the EMA beta must lie in [0, 1), got {beta}')
        self.beta = beta
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo = frozen).eval().requires_grad_(False)     # frozen ones: the same objects
        # their names in `module` (and in the model): saved once, under the model, in a checkpoint
        self.shared = tuple(name for name, p in self.module.named_parameters(remove_duplicate = False) if id(p) in frozen)
        self.register_buffer('num_updates', torch.zeros((), dtype = torch.long))
        self.__dict__['online'] = model        # not a submodule: its weights are not the EMA's state

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None):
        """Call after each optimizer step. `skip`: a bool (or 0 / 1) scalar tensor on the device;
        where it is set (the trainer's skipped, non-finite step) nothing changes. The weight of
        the step is a tensor too, so that an update never waits on the device to read
        `num_updates` or `skip` (docs/performance.md)."""
        device = self.num_updates.device
        weight = torch.full((), 1. - self.beta, dtype = torch.float64, device = device)
        weight = weight.masked_fill(self.num_updates == 0, 1.)            # the first update copies
        if skip is not None:
            skip = skip.to(device = device, dtype = torch.bool)
            weight = weight.masked_fill(skip, 0.)
        weights = {}
        for (name, averaged), online in zip(self.module.named_parameters(), self.online.parameters(), strict = True):
            if averaged is online:
                if online.requires_grad:
                    raise RuntimeError(f'EMA: {name} was frozen when the EMA was made, so the EMA shares it rather than '
                                       'averaging it, but it trains now: make a new EMA after unfreezing weights')
                continue
            key = (averaged.device, averaged.dtype)
            if key not in weights:
                weights[key] = weight.to(*key)
            averaged.lerp_(online.detach(), weights[key])
        for averaged, online in zip(self.module.buffers(), self.online.buffers(), strict = True):
            averaged.copy_(online)
        self.num_updates += 1 if skip is None else (~skip).long()

    @property
    def ema_model(self) -> nn.Module:
        return self.module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sample(self, *args, **kwargs):
        return self.module.sample(*args, **kwargs)

    def sample_one(self, *args, **kwargs):
        return self.module.sample_one(*args, **kwargs)

    def sample_many(self, *args, **kwargs):
        return self.module.sample_many(*args, **kwargs)

    def generate_text_only(self, *args, **kwargs):
        return self.module.generate_text_only(*args, **kwargs)

    def generate_modality_only(self, *args, **kwargs):
        return self.module.generate_modality_only(*args, **kwargs)
