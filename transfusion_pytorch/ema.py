"""An exponential moving average of a model's weights, for sampling and evaluation.

Built on `torch.optim.swa_utils.AveragedModel` with its EMA update (buffers are averaged too).
The first `update()` copies the weights; each later one moves them a fraction `1 - beta`
towards the online model's. Under FSDP the averaged copy is sharded like the online model
(see `training/parallelize.py`), so each rank averages only its own shards.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    def __init__(self, model: nn.Module, beta: float = 0.99):
        if not 0. <= beta < 1.:
            raise ValueError(f'the EMA beta must lie in [0, 1), got {beta}')
        super().__init__(model, multi_avg_fn = get_ema_multi_avg_fn(beta), use_buffers = True)
        self.beta = beta
        self.module.eval().requires_grad_(False)
        self.__dict__['online'] = model        # not a submodule: its weights are not the EMA's state

    def update(self):
        """Call after each optimizer step."""
        self.update_parameters(self.online)

    @property
    def ema_model(self) -> nn.Module:
        return self.module

    def sample(self, *args, **kwargs):
        return self.module.sample(*args, **kwargs)

    def generate_text_only(self, *args, **kwargs):
        return self.module.generate_text_only(*args, **kwargs)

    def generate_modality_only(self, *args, **kwargs):
        return self.module.generate_modality_only(*args, **kwargs)
