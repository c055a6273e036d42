"""An exponential moving average of a model's weights, usable wherever the model is: it
forwards `forward`, `sample`, `generate_text_only` and every other attribute to its copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, beta: float = 0.999):
        super().__init__()
        if not 0. <= beta < 1.:
            raise ValueError(f'`beta` of the EMA must lie in [0, 1), got {beta}')
        self.beta = beta
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self._online = (model,)         # a tuple, so the online model is not registered as a submodule
        self.register_buffer('num_updates', torch.zeros((), dtype = torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module | None = None):
        """ema = beta * ema + (1 - beta) * online; the first update copies the online weights."""
        model = self._online[0] if model is None else model
        weight = 1. if int(self.num_updates) == 0 else 1. - self.beta
        for ema_param, param in zip(self.ema_model.parameters(), model.parameters()):
            ema_param.lerp_(param.detach().to(ema_param.dtype), weight)
        for ema_buffer, buffer in zip(self.ema_model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == 'ema_model':
                raise
            return getattr(self.ema_model, name)
