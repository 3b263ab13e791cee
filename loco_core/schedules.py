"""Noise schedules in the variance-exploding form x = x0 + sigma * noise.

A variance-preserving (VP) model with cumulative signal fraction alpha_bar takes
x_vp = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise. Dividing by
sqrt(alpha_bar) gives the form above with sigma = sqrt((1 - alpha_bar) / alpha_bar),
which is the convention of ComfyUI's samplers and of this engine.

Noise levels are also named by t in (0, 1], the fraction of diffusion time
(t = 1 is pure noise), as ComfyUI's ``percent_to_sigma(1 - t)`` does.
"""

import math
from typing import Callable

import torch

from .errors import LocoError

# Smallest sigma an inversion starts from: ComfyUI's FlipSigmas replaces a
# leading 0 with the same value, since the ODE step divides by sigma.
SIGMA_FLOOR = 1e-4


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if bool(((alpha_bar <= 0) | (alpha_bar > 1)).any()):
        raise LocoError("alpha_bar must lie in (0, 1]; got values outside that range")
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if bool((sigma < 0).any()):
        raise LocoError("sigma must be non-negative")
    return 1.0 / (1.0 + sigma**2)


def vp_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Cumulative products of 1 - beta for a discrete VP schedule.

    "scaled_linear" is linear in sqrt(beta) (Stable Diffusion 1.x and what
    ComfyUI calls "linear"); "linear" is linear in beta (DDPM).
    """
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    else:
        raise LocoError(f"unknown beta_schedule {beta_schedule!r}; use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteVPSchedule:
    """Sigma table of a discrete VP model, interpolated in log sigma like ComfyUI's ModelSamplingDiscrete."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = alpha_bar_to_sigma(alphas_cumprod)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_at(self, t: float) -> float:
        """Sigma at diffusion time fraction t in (0, 1]; t = 1 is the last timestep."""
        if not 0.0 < t <= 1.0:
            raise LocoError(f"noise level t={t} is outside (0, 1]; 0.5 to 0.7 suits LOCO edits")
        position = t * (len(self.sigmas) - 1)
        low = math.floor(position)
        high = math.ceil(position)
        weight = position - low
        log_sigma = (1.0 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]
        return float(log_sigma.exp())


def level_grid(sigma_at: Callable[[float], float], t_edit: float, steps: int) -> torch.Tensor:
    """Ascending sigmas from SIGMA_FLOOR up to the edit level t_edit.

    Point i (1..steps) is sigma_at(t_edit * i / steps), so the grid has
    steps + 1 entries. Inversion walks it upward; decoding walks it reversed
    and replaces the floor with 0 for its last step.
    """
    if steps < 1:
        raise LocoError(f"steps={steps}; use at least 1 ODE step")
    if not 0.0 < t_edit <= 1.0:
        raise LocoError(f"edit level t={t_edit} is outside (0, 1]; 0.5 to 0.7 suits LOCO edits")

    sigmas = [sigma_at(t_edit * i / steps) for i in range(1, steps + 1)]
    grid = torch.tensor([SIGMA_FLOOR, *sigmas], dtype=torch.float64)

    if not bool(torch.isfinite(grid).all()):
        raise LocoError(f"the schedule gives a non-finite sigma below t={t_edit}; lower the edit level")
    if bool((grid[1:] <= grid[:-1]).any()):
        raise LocoError(
            f"sigmas up to t={t_edit} with {steps} steps are not increasing; "
            "use fewer steps or check the schedule"
        )
    return grid
