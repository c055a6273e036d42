"""ODE solvers for sampling a flow: dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

The model predicts velocity; this module owns the time grid and the update (the split of
diffusers' model / scheduler, and of facebookresearch/flow_matching's path / solver).

- `time_grid`: an explicit grid from 0 to 1, optionally shifted towards the noisy end
  (the resolution-dependent shift of Esser et al., "Scaling Rectified Flow Transformers"
  (SD3), 2024, https://arxiv.org/abs/2403.03206);
- fixed-grid steps, Euler and midpoint, each written once as a generator of its stages:
  it yields the points (x, t) where it needs the velocity and is sent the velocity back.
  `euler_step(velocity_fn, x, t, t_next)` drives one synchronously; a batched sampler
  drives the stages of many rows, each at its own step, with one model call per stage;
- adaptive solvers (dopri5, ...) through `torchdiffeq` (Chen et al., "Neural ODEs", 2018),
  which calls the velocity function itself and so always runs synchronously.
"""

from __future__ import annotations

from typing import Callable, Generator

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]     # (x, t as a 0-d tensor) -> velocity, same shape as x

# a step that yields (x, t) for each velocity it needs, is sent v(x, t), and returns x at t_next
Stages = Generator[tuple[Tensor, float], Tensor, Tensor]

FIXED_METHODS = ('euler', 'midpoint')
ADAPTIVE_METHODS = ('dopri5', 'dopri8', 'bosh3', 'fehlberg2', 'adaptive_heun')     # torchdiffeq's adaptive solvers


def shift_times(times: Tensor, shift: float) -> Tensor:
    """Moves a grid towards t = 0 (the noisy end) for shift > 1. In terms of the noise level
    sigma = 1 - t this is SD3's sigma' = shift * sigma / (1 + (shift - 1) * sigma); 0 and 1 stay put."""
    sigma = 1. - times
    return 1. - shift * sigma / (1. + (shift - 1.) * sigma)


def time_grid(steps: int, shift: float = 1., device: torch.device | str | None = None) -> Tensor:
    """(steps + 1,) times from 0 to 1."""
    if steps < 1:
        raise ValueError(f'the number of ODE steps must be at least 1, got {steps}')
    if shift <= 0:
        raise ValueError(f'the time shift must be positive, got {shift}')
    times = torch.linspace(0., 1., steps + 1, device = device)
    return times if shift == 1. else shift_times(times, shift)


def euler_stages(x: Tensor, t: float, t_next: float) -> Stages:
    velocity = yield x, t
    return x + (t_next - t) * velocity


def midpoint_stages(x: Tensor, t: float, t_next: float) -> Stages:
    dt = t_next - t
    velocity = yield x, t
    velocity_mid = yield x + 0.5 * dt * velocity, t + 0.5 * dt
    return x + dt * velocity_mid


STAGES = dict(euler = euler_stages, midpoint = midpoint_stages)


def stages(method: str, x: Tensor, t: float, t_next: float) -> Stages:
    if method not in STAGES:
        raise ValueError(f'unknown fixed-grid ODE method {method!r}, expected one of {FIXED_METHODS}')
    return STAGES[method](x, t, t_next)


def drive(step: Stages, velocity_fn: VelocityFn) -> Tensor:
    """Runs the stages of one step synchronously."""
    x, t = next(step)
    while True:
        velocity = velocity_fn(x, torch.tensor(t, device = x.device))
        try:
            x, t = step.send(velocity)
        except StopIteration as done:
            return done.value


def euler_step(velocity_fn: VelocityFn, x: Tensor, t: float, t_next: float) -> Tensor:
    return drive(euler_stages(x, t, t_next), velocity_fn)


def midpoint_step(velocity_fn: VelocityFn, x: Tensor, t: float, t_next: float) -> Tensor:
    return drive(midpoint_stages(x, t, t_next), velocity_fn)


def integrate(
    velocity_fn: VelocityFn,
    x0: Tensor,
    times: Tensor,
    method: str = 'euler',
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Tensor:
    """x at times[-1], starting from x0 at times[0]. Fixed-grid methods step over `times`;
    any other method name goes to `torchdiffeq.odeint`, which adapts its own steps and
    reports at the grid's end."""
    grid = times.tolist()

    if method in FIXED_METHODS:
        x = x0
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = drive(stages(method, x, t, t_next), velocity_fn)
        return x

    from torchdiffeq import odeint

    def derivative(t: Tensor, x: Tensor) -> Tensor:
        return velocity_fn(x, t)

    ends = torch.tensor([grid[0], grid[-1]], device = x0.device, dtype = torch.float32)
    # torchdiffeq's adaptive solvers step past the last time and interpolate back to it, which
    # would evaluate the model at times it never saw in training (t > 1): the last step is
    # made to end on the grid's end instead (`step_t`)
    return odeint(derivative, x0, ends, method = method, atol = atol, rtol = rtol, options = dict(step_t = ends[-1:]))[-1]
