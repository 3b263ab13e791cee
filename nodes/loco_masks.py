"""Bring a ComfyUI MASK to the grid where the Jacobian is taken: the latent, or the VAE's decoded image.

Policy:
- Rank: [H, W], [B, H, W] and [B, 1, H, W] are accepted, any numeric dtype.
  Boolean and integer masks count nonzero as inside; float masks must lie in
  [0, 1] and act as soft weights on the denoiser output.
- Batch: one mask applies to every image. Otherwise the mask batch must equal
  the latent batch, and the chosen image's entry is used.
- Size: a mask of the latent's size is used as it is. A mask of the decoded
  image's size (an integer multiple f of the latent size, the same f for
  height and width, as 8 for Stable Diffusion) is area-averaged down to the
  latent grid. Any other size is an error, because stretching would move the
  edit region.
- Decoded image: when the mask acts on the VAE decoder's output, a mask of
  the decoded image's size is used as it is, and an integer multiple of it
  is area-averaged down the same way.
"""

import torch
import torch.nn.functional as F

from ..loco_core import LocoError


def mask_to_latent(mask: torch.Tensor, latent_shape: tuple[int, ...], batch_index: int = 0) -> torch.Tensor:
    """Weights [1, h, w] in [0, 1] for image ``batch_index`` of a latent [B, C, h, w]."""
    return _select(mask, latent_shape, batch_index, "latent")


def mask_to_decoded(mask: torch.Tensor, decoded_shape: tuple[int, ...], batch_index: int = 0) -> torch.Tensor:
    """Weights [1, H, W] in [0, 1] for image ``batch_index`` of a decoded batch [B, C, H, W]."""
    return _select(mask, decoded_shape, batch_index, "decoded image")


def _select(mask: torch.Tensor, grid_shape: tuple[int, ...], batch_index: int, grid_name: str) -> torch.Tensor:
    batch, _, height, width = grid_shape
    weights = _as_float(mask)

    if weights.ndim == 2:
        weights = weights[None]
    elif weights.ndim == 4 and weights.shape[1] == 1:
        weights = weights[:, 0]
    elif weights.ndim != 3:
        raise LocoError(f"MASK of shape {tuple(mask.shape)} is not supported; use [H,W], [B,H,W] or [B,1,H,W]")

    if weights.shape[0] == batch and batch > 1:
        weights = weights[batch_index : batch_index + 1]
    elif weights.shape[0] != 1:
        raise LocoError(
            f"MASK batch of {weights.shape[0]} does not match the image batch of {batch}; "
            "give one mask for all images or one per image"
        )

    return _resize(weights, height, width, grid_name)


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return (mask != 0).float()
    weights = mask.float()
    if not bool(torch.isfinite(weights).all()):
        raise LocoError("MASK contains NaN or infinite values")
    if bool((weights < 0).any()) or bool((weights > 1).any()):
        raise LocoError(
            f"MASK values range from {float(weights.min()):.3g} to {float(weights.max()):.3g}; "
            "a mask must lie in [0, 1]"
        )
    return weights


def _resize(weights: torch.Tensor, height: int, width: int, grid_name: str) -> torch.Tensor:
    mask_height, mask_width = weights.shape[-2:]
    if (mask_height, mask_width) == (height, width):
        return weights.clone()

    factor = mask_height // height
    exact = factor >= 1 and mask_height == factor * height and mask_width == factor * width
    if exact:
        return F.avg_pool2d(weights[:, None], kernel_size=factor)[:, 0]

    if grid_name == "latent":
        hint = (
            f"use a mask of the latent's size, {width}x{height}, or of the image's size, an integer multiple of it "
            f"({8 * width}x{8 * height} for Stable Diffusion's VAE, which downscales by 8)"
        )
    else:
        hint = f"use a mask of the decoded image's size, {width}x{height}"
    raise LocoError(f"MASK is {mask_width}x{mask_height} but the {grid_name} is {width}x{height}; {hint}")
