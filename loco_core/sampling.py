"""Deterministic DDIM (eta 0) inversion and decoding in sigma space.

DDIM with eta 0 is the Euler step of the probability-flow ODE written with
the denoiser D:  x <- x + (sigma_next - sigma) * (x - D(x, sigma)) / sigma.
Inversion walks an ascending grid from SIGMA_FLOOR to the edit level.
Decoding walks the same grid reversed, with the floor replaced by 0, so the
last step returns D(x, sigma_1). Decoding an unedited inverted latent is therefore the
"plain decode", and an edit of strength 0 reproduces it exactly.
"""

from typing import Callable

import torch

from .denoiser import Denoiser, check_finite, sigma_batch
from .errors import LocoError

StepCallback = Callable[[int, int], None]


def ode_step(denoiser: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    if sigma <= 0:
        raise LocoError(f"an ODE step cannot start at sigma={sigma}; start from a positive sigma")
    with torch.no_grad():
        denoised = denoiser(x, sigma_batch(sigma, x.shape[0], x))
    if sigma_next == 0:
        return denoised
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    grid: torch.Tensor,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Carry a clean batch x0 up the ascending sigma ``grid`` to sigma = grid[-1]."""
    _check_grid(grid)
    check_finite("the image to invert", x0)
    x = x0
    steps = len(grid) - 1
    for i in range(steps):
        x = ode_step(denoiser, x, float(grid[i]), float(grid[i + 1]))
        if on_step is not None:
            on_step(i + 1, steps)
    check_finite("the inverted latent", x)
    return x


def decode(
    denoiser: Denoiser,
    x: torch.Tensor,
    grid: torch.Tensor,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Carry a batch at sigma = grid[-1] down the reversed ascending ``grid`` to sigma = 0."""
    _check_grid(grid)
    check_finite("the latent to decode", x)
    descending = grid.flip(0).tolist()
    descending[-1] = 0.0
    steps = len(descending) - 1
    for i in range(steps):
        x = ode_step(denoiser, x, descending[i], descending[i + 1])
        if on_step is not None:
            on_step(i + 1, steps)
    return x


def apply_direction(x: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """x + strength * direction, for a batch x [B, *shape] and one direction [*shape] or [1, *shape]."""
    if direction.numel() != x[0].numel():
        raise LocoError(
            f"the direction has {direction.numel()} entries but each latent has {x[0].numel()}; "
            "find directions on a latent of this size"
        )
    direction = direction.reshape(1, *x.shape[1:])
    return x + strength * direction.to(device=x.device, dtype=x.dtype)


def _check_grid(grid: torch.Tensor) -> None:
    if grid.ndim != 1 or len(grid) < 2:
        raise LocoError("the sigma grid needs at least two entries")
    if float(grid[0]) <= 0:
        raise LocoError(f"the sigma grid starts at {float(grid[0])}; start at a small positive sigma such as 1e-4")
    if bool((grid[1:] <= grid[:-1]).any()):
        raise LocoError("the sigma grid must increase strictly")
    if not bool(torch.isfinite(grid).all()):
        raise LocoError("the sigma grid contains a non-finite value")
