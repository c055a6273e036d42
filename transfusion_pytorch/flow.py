"""Flow matching: one time convention everywhere.

t = 0 is pure noise x0 ~ N(0, I), t = 1 is data x1. The path is the straight line

    x_t = t * x1 + (1 - t) * x0

whose velocity, the model's regression target, is x1 - x0 (Lipman et al., 2022; Liu et al.,
"Rectified Flow", 2022). Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def interpolate(noise: Tensor, data: Tensor, times: Tensor) -> Tensor:
    """x_t for `times` broadcastable against the data, e.g. (N, 1) for (N, dim) tokens."""
    return times * data + (1. - times) * noise


def velocity_target(noise: Tensor, data: Tensor) -> Tensor:
    return data - noise


TIME_DISTRIBUTIONS = ('logit_normal', 'uniform')


def training_times(num: int, distribution: str = 'logit_normal', mean: float = 0., std: float = 1.,
                   device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(num,) times in [0, 1] to train at: uniform, or logit-normal, t = sigmoid(mean + std * n)
    with n ~ N(0, 1), which puts more of them at the middle of the path, where the velocity is
    hardest to predict, and fewer near noise and data (Esser et al., 2024, "Scaling Rectified
    Flow Transformers for High-Resolution Image Synthesis", section 3.1; their best sampler in
    section 5.1 is logit-normal with mean 0 and std 1)."""
    if distribution == 'uniform':
        return torch.rand(num, device = device, generator = generator)
    return torch.sigmoid(mean + std * torch.randn(num, device = device, generator = generator))
