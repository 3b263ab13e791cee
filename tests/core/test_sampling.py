import math

import pytest
import torch

from loco_core import (
    SIGMA_FLOOR,
    DiscreteVPSchedule,
    LocoError,
    alpha_bar_to_sigma,
    apply_direction,
    decode,
    invert,
    level_grid,
    sigma_to_alpha_bar,
    vp_alphas_cumprod,
)
from loco_core.closed_form import low_rank_gaussian


def test_alpha_bar_sigma_round_trip():
    alpha_bar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    sigma = alpha_bar_to_sigma(alpha_bar)
    torch.testing.assert_close(sigma[1], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(sigma_to_alpha_bar(sigma), alpha_bar)


def test_discrete_schedule_matches_its_table():
    alphas_cumprod = vp_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    schedule = DiscreteVPSchedule(alphas_cumprod)
    table = alpha_bar_to_sigma(alphas_cumprod)

    assert schedule.sigma_at(1.0) == pytest.approx(float(table[-1]))
    assert schedule.sigma_at(0.5) == pytest.approx(math.sqrt(float(table[499] * table[500])), rel=1e-3)
    assert schedule.sigma_at(600 / 999) == pytest.approx(float(table[600]))
    # Stable Diffusion 1.x: sigma_max is about 14.6.
    assert schedule.sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_level_grid_is_floor_then_schedule():
    schedule = DiscreteVPSchedule(vp_alphas_cumprod())
    grid = level_grid(schedule.sigma_at, 0.6, 30)

    assert len(grid) == 31
    assert float(grid[0]) == SIGMA_FLOOR
    assert float(grid[-1]) == pytest.approx(schedule.sigma_at(0.6))
    assert bool((grid[1:] > grid[:-1]).all())


@pytest.mark.parametrize("t_edit", [0.0, -0.2, 1.5, float("nan")])
def test_level_outside_schedule_raises(t_edit):
    schedule = DiscreteVPSchedule(vp_alphas_cumprod())
    with pytest.raises(LocoError, match=r"outside \(0, 1\]"):
        level_grid(schedule.sigma_at, t_edit, 10)


def test_grid_starting_at_zero_raises():
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    with pytest.raises(LocoError, match="small positive sigma"):
        invert(model, torch.zeros(1, 3, 4, 4, dtype=torch.float64), grid)


def test_ddim_round_trip_returns_input():
    # Euler's error is first order, so the round trip closes as 1 / steps:
    # about 0.76 / steps here, below 1e-4 at 8,000 steps.
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    x0 = model.sample(2, seed=0)
    grid = level_grid(lambda t: 2.5 * t, 0.6, 8000)

    noisy = invert(model, x0, grid)
    restored = decode(model, noisy, grid)

    assert float((noisy - x0).abs().max()) > 0.5
    assert float((restored - x0).abs().max()) < 1e-4


def test_round_trip_error_shrinks_on_discrete_schedule():
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    x0 = model.sample(2, seed=1)
    schedule = DiscreteVPSchedule(vp_alphas_cumprod())

    errors = []
    for steps in (10, 40, 160):
        grid = level_grid(schedule.sigma_at, 0.6, steps)
        errors.append(float((decode(model, invert(model, x0, grid), grid) - x0).abs().max()))

    assert errors[0] > errors[1] > errors[2]


def test_zero_strength_reproduces_plain_decode():
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    grid = level_grid(DiscreteVPSchedule(vp_alphas_cumprod()).sigma_at, 0.6, 20)
    noisy = invert(model, model.sample(1, seed=2), grid)
    direction = torch.randn(3, 4, 4, dtype=torch.float64)

    plain = decode(model, noisy, grid)
    edited = decode(model, apply_direction(noisy, direction, 0.0), grid)
    moved = decode(model, apply_direction(noisy, direction, 3.0), grid)

    assert torch.equal(plain, edited)
    assert float((moved - plain).abs().max()) > 1e-3


def test_step_callback_sees_every_step():
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    grid = level_grid(lambda t: 2.0 * t, 0.5, 7)
    seen = []
    invert(model, model.sample(1, seed=0), grid, on_step=lambda i, total: seen.append((i, total)))
    assert seen == [(i, 7) for i in range(1, 8)]


def test_bad_direction_size_raises():
    with pytest.raises(LocoError, match="entries"):
        apply_direction(torch.zeros(2, 3, 4, 4), torch.zeros(3, 5, 5), 1.0)


def test_nan_image_raises():
    model = low_rank_gaussian((3, 4, 4), rank=4, seed=0)
    grid = level_grid(lambda t: 2.0 * t, 0.5, 5)
    with pytest.raises(LocoError, match="NaN"):
        invert(model, torch.full((1, 3, 4, 4), float("nan"), dtype=torch.float64), grid)
