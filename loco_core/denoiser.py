"""The denoiser contract every part of the engine relies on.

A denoiser is a callable ``D(x, sigma)`` that returns the posterior-mean (x0)
estimate E[x0 | x] for a batch: ``x`` has shape [B, ...] in the form
x = x0 + sigma * noise, and ``sigma`` is a 1-D tensor of length B. Every batch
element is processed independently, so the engine may stack several copies of
one image into one call.
"""

from typing import Protocol

import torch

from .errors import LocoError


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def sigma_batch(sigma: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Sigma as a 1-D tensor of batch length on the device of ``like``."""
    dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=like.device)
    if sigma.numel() != 1:
        raise LocoError(f"expected one noise level, got a sigma tensor with {sigma.numel()} values")
    if not bool(torch.isfinite(sigma)) or float(sigma) < 0:
        raise LocoError(f"sigma={float(sigma)} is invalid; use a finite, non-negative noise level")
    return sigma.reshape(1).expand(batch).clone()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LocoError(f"{name} contains NaN or infinite values; check the input image or latent")
