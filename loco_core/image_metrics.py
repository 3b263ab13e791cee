"""Image similarity metrics for comparing diffusion samples, in pure torch.

Images are ``[N, C, H, W]`` float tensors with values in 0..1. Every metric
is a similarity (larger means more alike), so thresholds and ROC curves
read the same way for all of them:

- ``ssim``: structural similarity (Wang et al. 2004, "Image quality
  assessment: from error visibility to structural similarity") with an
  11x11 Gaussian window of standard deviation 1.5, K1 = 0.01, K2 = 0.03,
  data range 1, statistics over the window's valid positions only (no
  padding), averaged over channels and positions. Range -1..1.
- ``pixel_cosine``: cosine similarity of the flattened images after each
  image's own mean is subtracted, so a shared background brightness does
  not make unrelated images look alike. Range -1..1.
- ``mae``: 1 - mean absolute error. Range 0..1 for images in 0..1.
- embedding cosine: cosine similarity of feature vectors (for example CLIP
  vision image embeddings), see ``embedding_cosine_matrix``.
"""

import torch

PIXEL_METRICS: tuple[str, ...] = ("ssim", "pixel_cosine", "mae")

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_image_batch(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be an image tensor [N, C, H, W], got {shape}")


def _check_same_image_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_image_batch(a, "first image batch")
    _check_image_batch(b, "second image batch")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"images must have the same [C, H, W] to be compared, got {tuple(a.shape[1:])} and "
            f"{tuple(b.shape[1:])}; resize one batch to the other's size first"
        )


def gaussian_window(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Return a normalised 2-D Gaussian window ``[size, size]`` in float64."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"window sigma must be positive, got {sigma}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    profile = profile / profile.sum()
    return profile[:, None] * profile[None, :]


def _local_mean(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # Depthwise valid convolution: every channel is filtered on its own.
    channels = images.shape[1]
    kernel = window.to(images.dtype).expand(channels, 1, *window.shape)
    return torch.nn.functional.conv2d(images, kernel, groups=channels)


def ssim_pairs(
    a: torch.Tensor,
    b: torch.Tensor,
    window_size: int = SSIM_WINDOW_SIZE,
    sigma: float = SSIM_SIGMA,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Compute the SSIM of each pair ``(a[i], b[i])``; returns ``[N]``.

    Computed in float64 so that SSIM(x, x) is 1 to rounding error.
    """
    _check_same_image_shape(a, b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"ssim_pairs needs batches of equal length, got {a.shape[0]} and {b.shape[0]}")
    height, width = a.shape[-2:]
    if height < window_size or width < window_size:
        raise ValueError(
            f"images of {height}x{width} are smaller than the {window_size}x{window_size} SSIM window; "
            "use larger images or a smaller window"
        )

    a = a.to(torch.float64)
    b = b.to(torch.float64)
    window = gaussian_window(window_size, sigma)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    mu_a = _local_mean(a, window)
    mu_b = _local_mean(b, window)
    var_a = _local_mean(a * a, window) - mu_a**2
    var_b = _local_mean(b * b, window) - mu_b**2
    cov = _local_mean(a * b, window) - mu_a * mu_b

    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def pixel_cosine_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute the cosine similarity of each mean-centred pair ``(a[i], b[i])``; returns ``[N]``.

    A constant image has no direction after centring, and its similarity is 0.
    """
    _check_same_image_shape(a, b)
    a_flat = _centre(a.flatten(1).to(torch.float64))
    b_flat = _centre(b.flatten(1).to(torch.float64))
    return torch.nn.functional.cosine_similarity(a_flat, b_flat, dim=1, eps=1e-12)


def _centre(flat: torch.Tensor) -> torch.Tensor:
    return flat - flat.mean(dim=1, keepdim=True)


def mae_similarity_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute 1 - mean absolute error of each pair ``(a[i], b[i])``; returns ``[N]``."""
    _check_same_image_shape(a, b)
    difference = (a.to(torch.float64) - b.to(torch.float64)).abs()
    return 1.0 - difference.flatten(1).mean(dim=1)


_PAIR_FUNCTIONS = {
    "ssim": ssim_pairs,
    "pixel_cosine": pixel_cosine_pairs,
    "mae": mae_similarity_pairs,
}


def similarity_pairs(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Compute the similarity of each pair ``(a[i], b[i])`` with a pixel metric; returns ``[N]``."""
    return _pair_function(metric)(a, b)


def _pair_function(metric: str):
    if metric not in _PAIR_FUNCTIONS:
        raise ValueError(f"unknown pixel metric {metric!r}; choose one of {', '.join(PIXEL_METRICS)}")
    return _PAIR_FUNCTIONS[metric]


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, metric: str, pairs_per_chunk: int = 1024) -> torch.Tensor:
    """Compute the pixel-metric similarity of every pair ``(a[i], b[j])``; returns ``[len(a), len(b)]``.

    Pairs are evaluated in chunks of ``pairs_per_chunk`` to bound memory.
    """
    pair_function = _pair_function(metric)
    _check_same_image_shape(a, b)
    if pairs_per_chunk < 1:
        raise ValueError(f"pairs_per_chunk must be at least 1, got {pairs_per_chunk}")

    rows, columns = a.shape[0], b.shape[0]
    result = torch.empty(rows * columns, dtype=torch.float64)
    row_index = torch.arange(rows).repeat_interleave(columns)
    column_index = torch.arange(columns).repeat(rows)
    for start in range(0, rows * columns, pairs_per_chunk):
        stop = min(start + pairs_per_chunk, rows * columns)
        result[start:stop] = pair_function(a[row_index[start:stop]], b[column_index[start:stop]]).cpu()
    return result.reshape(rows, columns)


def embedding_cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute the cosine similarity of every pair of embeddings ``(a[i], b[j])``; returns ``[len(a), len(b)]``.

    ``a`` and ``b`` are ``[N, D]`` feature vectors (any further dimensions are
    flattened).
    """
    a_flat = a.flatten(1).to(torch.float64)
    b_flat = b.flatten(1).to(torch.float64)
    if a_flat.shape[1] != b_flat.shape[1]:
        raise ValueError(f"embeddings differ in size: {a_flat.shape[1]} and {b_flat.shape[1]}")
    a_unit = torch.nn.functional.normalize(a_flat, dim=1, eps=1e-12)
    b_unit = torch.nn.functional.normalize(b_flat, dim=1, eps=1e-12)
    return a_unit @ b_unit.T


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images with antialiased bilinear filtering; a same-size batch is returned as a copy."""
    _check_image_batch(images, "images")
    if images.shape[-2:] == (height, width):
        return images.clone()
    resized = torch.nn.functional.interpolate(
        images.to(torch.float32), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp(0.0, 1.0)
