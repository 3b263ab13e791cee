"""Salience maps and foreground masks for dual-perturbation attacks.

The built-in salience map is the spectral residual of Hou and Zhang,
"Saliency Detection: A Spectral Residual Approach" (CVPR 2007): the log
amplitude spectrum minus its local average, transformed back with the
original phase, squared and smoothed with a Gaussian. Every step is a torch
operation, so the map is differentiable and the attack objective can
penalise background salience of the perturbed image.

Tensor layouts: images are ``[B, C, H, W]`` float in 0..1 (channels first,
as classifiers take them); salience maps and masks are ``[B, H, W]``.
"""

import math

import torch
import torch.nn.functional as F

# Hou and Zhang compute the map on a downsampled image (64 px on the long
# side); larger inputs are reduced to this size first and the map is
# upsampled back.
DEFAULT_WORK_SIZE = 64

# Gaussian smoothing of the map, as a fraction of the shorter side of the
# working image (64 px -> sigma 3.2 px).
DEFAULT_BLUR_FRACTION = 0.05

# Side of the box filter that gives the local average of the log amplitude.
AVERAGE_KERNEL_SIZE = 3

# Floor added to the spectrum's amplitude, relative to its root mean square.
# Synthetic images (flat backgrounds, padded digits) have exact zeros in the
# spectrum; without a floor their log amplitude is about -inf and the
# residual is dominated by those zeros instead of the image content.
AMPLITUDE_FLOOR = 1e-2
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Convert ``[B, C, H, W]`` images (C = 1 or 3) to ``[B, H, W]`` luma."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    channels = images.shape[1]
    if channels == 1:
        return images[:, 0]
    if channels == 3:
        weights = images.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1)
    raise ValueError(f"salience needs 1 or 3 colour channels, got {channels}; drop the alpha channel first")


def _gaussian_kernel_1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    positions = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``[B, H, W]`` maps with a separable Gaussian (sigma in pixels, reflect padding)."""
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel_1d(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)

    # Reflect padding needs the pad to be smaller than the side; replicate
    # covers tiny maps.
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def _resize_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if maps.shape[-2:] == (height, width):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)


def spectral_residual_salience(
    images: torch.Tensor,
    work_size: int = DEFAULT_WORK_SIZE,
    blur_fraction: float = DEFAULT_BLUR_FRACTION,
) -> torch.Tensor:
    """Compute the spectral residual salience map, ``[B, H, W]`` scaled so each image's maximum is 1.

    ``images`` is ``[B, C, H, W]`` in 0..1 with C = 1 or 3. The map is
    computed at ``work_size`` pixels on the long side (never upsampled) and
    resized back to H x W. The result is differentiable with respect to the
    images.
    """
    if work_size < 8:
        raise ValueError(f"work_size must be at least 8 pixels, got {work_size}")
    if blur_fraction < 0:
        raise ValueError(f"blur_fraction must be >= 0, got {blur_fraction}")
    gray = to_grayscale(images)
    height, width = gray.shape[-2:]

    # Reduce to the working resolution; area averaging keeps it differentiable.
    scale = min(1.0, work_size / max(height, width))
    work_h, work_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (work_h, work_w) != (height, width):
        gray = F.interpolate(gray.unsqueeze(1), size=(work_h, work_w), mode="area").squeeze(1)

    # Log amplitude and phase of the spectrum. The floor also keeps the
    # gradient finite where a frequency component is zero.
    spectrum = torch.fft.fft2(gray.to(torch.float32))
    power = spectrum.real**2 + spectrum.imag**2
    floor = AMPLITUDE_FLOOR**2 * power.flatten(1).mean(dim=1).view(-1, 1, 1) + 1e-12
    amplitude = torch.sqrt(power + floor)
    log_amplitude = torch.log(amplitude)
    phase = spectrum / amplitude

    # Spectral residual: log amplitude minus its local average. The spectrum
    # is periodic, so the box filter wraps around.
    pad = AVERAGE_KERNEL_SIZE // 2
    padded = F.pad(log_amplitude.unsqueeze(1), (pad, pad, pad, pad), mode="circular")
    local_average = F.avg_pool2d(padded, AVERAGE_KERNEL_SIZE, stride=1).squeeze(1)
    residual = log_amplitude - local_average

    # Back to image space with the original phase; squared magnitude, smoothed.
    salience = torch.fft.ifft2(torch.exp(residual) * phase)
    salience = salience.real**2 + salience.imag**2
    salience = gaussian_blur(salience, blur_fraction * min(work_h, work_w))

    salience = _resize_maps(salience, height, width).clamp_min(0.0)
    peak = salience.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (salience / peak).to(images.dtype)


def mask_from_salience(
    salience: torch.Tensor,
    threshold: float | None = None,
    top_fraction: float | None = None,
) -> torch.Tensor:
    """Turn ``[B, H, W]`` salience maps into 0/1 foreground masks.

    Give exactly one of ``threshold`` (foreground where the map, scaled to a
    maximum of 1 per image, is >= threshold) or ``top_fraction`` (the most
    salient fraction of pixels per image; ties at the cut-off are included).
    """
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold or top_fraction")
    if salience.ndim != 3:
        raise ValueError(f"salience must be [B, H, W], got shape {tuple(salience.shape)}")
    peak = salience.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    scaled = salience / peak

    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in 0..1, got {threshold}")
        return (scaled >= threshold).to(salience.dtype)

    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat = scaled.flatten(1)
    count = max(1, round(top_fraction * flat.shape[1]))
    cutoff = flat.topk(count, dim=1).values[:, -1].view(-1, 1, 1)
    return (scaled >= cutoff).to(salience.dtype)


def background_salience_share(salience: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Return the fraction of each map's total salience that lies outside the foreground, ``[B]``.

    ``salience`` and ``foreground`` are ``[B, H, W]``; the foreground is 0/1
    (or a soft weight in 0..1). A uniform map gives the background's area
    fraction; lower values mean a less conspicuous background.
    """
    background = 1.0 - foreground
    total = salience.flatten(1).sum(dim=1).clamp_min(1e-12)
    return (salience * background).flatten(1).sum(dim=1) / total


def normalize_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Bring a MASK given as ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` to ``[batch, H, W]`` float.

    A single mask is repeated over the batch. The spatial size must match
    the image; values must lie in 0..1. The input is not modified.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"a 4-D mask must be [B, 1, H, W], got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    elif mask.ndim != 3:
        raise ValueError(f"mask must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(mask.shape)}")

    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(
            f"mask is {mask.shape[-2]}x{mask.shape[-1]} but the image is {height}x{width}; "
            "resize the mask or the image so they match"
        )
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"mask batch is {mask.shape[0]} but the image batch is {batch}; give 1 mask or {batch}")
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, height, width)

    mask = mask.to(torch.float32).clone()
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"mask values must lie in 0..1, got range {mask.min().item():.3g}..{mask.max().item():.3g}")
    return mask
