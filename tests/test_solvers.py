import math

import pytest
import torch

from transfusion_pytorch import solvers


def test_time_grid_ends_and_shift():
    grid = solvers.time_grid(8)
    assert torch.allclose(grid, torch.linspace(0, 1, 9))

    shifted = solvers.time_grid(8, shift = 3.)
    assert shifted[0] == 0. and shifted[-1] == 1.
    assert (shifted.diff() > 0).all()
    # shift > 1 spends more of the grid near t = 0 (the noisy end)
    assert (shifted[1:-1] < grid[1:-1]).all()

    with pytest.raises(ValueError):
        solvers.time_grid(0)


def test_euler_is_exact_on_the_straight_flow_to_a_point():
    # data is a point c: the flow-matching velocity is (c - x) / (1 - t), whose paths are straight lines
    c = torch.tensor([2., -1., 0.5])
    x0 = torch.randn(5, 3)

    def velocity(x, t):
        return (c - x) / (1. - t)

    x1 = solvers.integrate(velocity, x0, solvers.time_grid(4, shift = 2.), method = 'euler')
    assert torch.allclose(x1, c.expand_as(x1), atol = 1e-5)


@pytest.mark.parametrize('method, steps, tolerance', [('euler', 200, 1e-2), ('midpoint', 50, 1e-4), ('dopri5', 1, 1e-5)])
def test_integrates_exponential_growth(method, steps, tolerance):
    # dx/dt = x: x(1) = e * x(0)
    x0 = torch.randn(4, 2, dtype = torch.float64)
    x1 = solvers.integrate(lambda x, t: x, x0, solvers.time_grid(steps).double(), method = method)
    assert torch.allclose(x1, math.e * x0, rtol = tolerance, atol = 0)


@pytest.mark.parametrize('method', solvers.ADAPTIVE_METHODS)
def test_adaptive_methods_never_evaluate_past_the_end(method):
    # torchdiffeq steps past the last time and interpolates back unless told otherwise; a flow
    # model has never seen t > 1
    times = []

    def velocity(x, t):
        times.append(float(t))
        return x

    x0 = torch.randn(4, 2, dtype = torch.float64)
    x1 = solvers.integrate(velocity, x0, solvers.time_grid(1).double(), method = method, atol = 1e-7, rtol = 1e-7)
    assert max(times) <= 1. and min(times) >= 0.
    assert torch.allclose(x1, math.e * x0, rtol = 1e-4, atol = 0)


def test_euler_error_shrinks_linearly_and_midpoint_quadratically():
    x0 = torch.ones(1, dtype = torch.float64)

    def error(method, steps):
        x1 = solvers.integrate(lambda x, t: x, x0, solvers.time_grid(steps).double(), method = method)
        return (x1 - math.e).abs().item()

    assert 1.8 < error('euler', 20) / error('euler', 40) < 2.2
    assert 3.6 < error('midpoint', 20) / error('midpoint', 40) < 4.4


def test_steps_match_their_stage_generators():
    x = torch.randn(3)
    velocity = lambda x, t: torch.sin(x) * t
    stepped = solvers.midpoint_step(velocity, x, 0.2, 0.5)
    by_hand = x + 0.3 * velocity(x + 0.15 * velocity(x, 0.2), 0.35)
    assert torch.allclose(stepped, by_hand)
    assert torch.allclose(solvers.euler_step(velocity, x, 0.2, 0.5), x + 0.3 * velocity(x, 0.2))


def test_unknown_method_fails():
    with pytest.raises(ValueError):
        solvers.stages('rk17', torch.zeros(1), 0., 1.)
