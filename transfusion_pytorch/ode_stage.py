"""The modality phase of a sampled row: noise at t = 0 integrated to t = 1 against the cached
prefix, then the clean latents and EOM committed (the sampler's state machine: `sampler.py`).

- A fixed-grid solver (`solvers.FIXED_METHODS`) is stepped in lockstep with the other rows:
  each stage is one request of the modality's tokens alone, at the stage's time, that the
  cache does not keep (`ModalityStage`); the last commits the clean latents (at t = 1, as
  training sees a finished sequence) and EOM in one step.
- An adaptive solver chooses its own evaluation times and calls the velocity function itself,
  so the row's modality is integrated in one go while the other rows wait
  (`integrate_alone`).

The noise at t = 0 is drawn from the row's generator, or taken from `init_modality_noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator

import torch
from torch import Tensor

from . import solvers
from .backends import Latents, Request
from .inputs import describe


@dataclass
class ModalityStage:
    """One row's modality while a fixed-grid solver denoises it."""
    model: object
    modality_type: int
    shape: tuple[int, ...]
    method: str
    grid: list[float]               # the solver's times, 0 to 1
    step: int                       # the grid interval being integrated
    stages: Generator               # `solvers.stages` of that interval

    @classmethod
    def start(cls, model, options, m: int, shape: tuple[int, ...], noise: Tensor) -> tuple[ModalityStage, Request]:
        """The stage and its first request: the noise at the grid's first time."""
        grid = solvers.time_grid(options.modality_steps, options.time_shift).tolist()
        stage = cls(model, m, shape, options.ode_method, grid, 0, solvers.stages(options.ode_method, noise, grid[0], grid[1]))
        return stage, stage.request(*next(stage.stages))

    def advance(self, velocity: Tensor) -> tuple[Request, bool]:
        """The next request given the velocity at the last one, and whether the modality is done
        (its request then commits the clean latents and EOM)."""
        try:
            return self.request(*self.stages.send(velocity)), False
        except StopIteration as done:
            x = done.value

        self.step += 1
        if self.step < len(self.grid) - 1:
            self.stages = solvers.stages(self.method, x, self.grid[self.step], self.grid[self.step + 1])
            return self.request(*next(self.stages)), False

        m = self.modality_type
        return Request([latents_item(self.model, m, x, self.shape), self.model.vocab.eom(m)]), True

    def request(self, x: Tensor, t: float) -> Request:
        """The latents at time t, for one model call the sequence does not keep."""
        return Request([latents_item(self.model, self.modality_type, x, self.shape)], time = t, keep = False)


def integrate_alone(backend, model, options, index: int, num_rows: int, m: int, shape: tuple[int, ...], noise: Tensor) -> Tensor:
    """An adaptive solver picks its own times and calls the velocity function itself, so it
    cannot be stepped in lockstep with other rows: row `index`'s modality is integrated here,
    in one go, one model call per evaluation on this row alone, while the other rows wait
    (their caches untouched). Their results do not depend on the batch either way."""

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        requests: list[Request | None] = [None] * num_rows
        requests[index] = Request([latents_item(model, m, x, shape)], time = float(t), keep = False)
        return backend.step(requests)[index]

    ends = torch.tensor([0., 1.], device = noise.device)
    return solvers.integrate(velocity_fn, noise, ends, method = options.ode_method, atol = options.ode_atol, rtol = options.ode_rtol)


def initial_noise(model, options, generator: torch.Generator | None, m: int, shape: tuple[int, ...]) -> Tensor:
    """(prod(shape), dim_latent) noise at t = 0: drawn from the row's generator, or taken from
    `init_modality_noise` (drawn all the same, so the generator advances the same way)."""
    noise = torch.randn(math.prod(shape), model.config.dim_latent[m], generator = generator).to(model.device)
    if options.init_modality_noise is not None:
        noise = given_noise(options.init_modality_noise, noise, m, shape)
    return noise


def latents_item(model, modality_type: int, values: Tensor, shape: tuple[int, ...]) -> Latents:
    return Latents(modality_type, values, tuple(shape), model.token_shape(modality_type, tuple(shape)))


def given_noise(given: Tensor, noise: Tensor, m: int, shape: tuple[int, ...]) -> Tensor:
    """`init_modality_noise` for a modality whose noise is `noise` (rows, dim_latent): the
    leading rows and columns of `given` seen as (n, d); given as (*shape, dim_latent), that is
    all of it."""
    rows, dim = check_noise(given, m, shape, noise.shape[1])
    return given.reshape(-1, given.shape[-1])[:rows, :dim].to(noise)


def check_noise(given: Tensor, m: int, shape: tuple[int, ...], dim: int) -> tuple[int, int]:
    """The (rows, dim) that a modality takes of `init_modality_noise`; an error when it holds less."""
    rows = math.prod(shape)
    if not noise_holds(given, rows, dim):
        raise ValueError(f'init_modality_noise must hold {rows} rows of {dim} values for the modality of type {m} and shape {shape} '
                         f'(as ({", ".join(map(str, shape))}{", " if shape else ""}{dim}), or as (n >= {rows}, d >= {dim}) of which the '
                         f'first rows and columns are taken), got {describe(given)}')
    return rows, dim


def noise_holds(given: Tensor, rows: int, dim: int) -> bool:
    return given[..., 0].numel() >= rows and given.shape[-1] >= dim
