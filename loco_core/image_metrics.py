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

from dataclasses import dataclass

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
    """Return the normalised 2-D Gaussian window ``[size, size]`` (float64) that SSIM averages with."""
    profile = _gaussian_profile(size, sigma)
    return profile[:, None] * profile[None, :]


def _gaussian_profile(size: int, sigma: float) -> torch.Tensor:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"window sigma must be positive, got {sigma}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    return profile / profile.sum()


def _valid_filter_matrix(length: int, profile: torch.Tensor) -> torch.Tensor:
    # Row k contains the window at offset k, so matrix @ signal is the valid
    # correlation of the signal with the window along one axis.
    size = profile.numel()
    matrix = torch.zeros(length - size + 1, length, dtype=profile.dtype)
    for offset in range(length - size + 1):
        matrix[offset, offset : offset + size] = profile
    return matrix


def _local_mean(images: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    # The Gaussian window is separable, so the 2-D valid filter is a banded
    # matrix product along the rows and one along the columns. Matrix
    # products run through BLAS and are much faster on CPU than a depthwise
    # float64 convolution.
    height, width = images.shape[-2:]
    vertical = _valid_filter_matrix(height, profile).to(images.device, images.dtype)
    horizontal = _valid_filter_matrix(width, profile).to(images.device, images.dtype)
    return vertical @ images @ horizontal.T


@dataclass
class _SsimStatistics:
    images: torch.Tensor
    mean: torch.Tensor
    second_moment: torch.Tensor


def _ssim_statistics(images: torch.Tensor, window_size: int, sigma: float) -> _SsimStatistics:
    height, width = images.shape[-2:]
    if height < window_size or width < window_size:
        raise ValueError(
            f"images of {height}x{width} are smaller than the {window_size}x{window_size} SSIM window; "
            "use larger images or a smaller window"
        )
    images = images.to(torch.float64)
    profile = _gaussian_profile(window_size, sigma)
    return _SsimStatistics(images, _local_mean(images, profile), _local_mean(images * images, profile))


def _ssim_from_statistics(
    a: _SsimStatistics, b: _SsimStatistics, window_size: int, sigma: float, data_range: float
) -> torch.Tensor:
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    profile = _gaussian_profile(window_size, sigma)
    var_a = a.second_moment - a.mean**2
    var_b = b.second_moment - b.mean**2
    cov = _local_mean(a.images * b.images, profile) - a.mean * b.mean

    luminance = (2 * a.mean * b.mean + c1) / (a.mean**2 + b.mean**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


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
    statistics_a = _ssim_statistics(a, window_size, sigma)
    statistics_b = _ssim_statistics(b, window_size, sigma)
    return _ssim_from_statistics(statistics_a, statistics_b, window_size, sigma, data_range)


def _ssim_matrix(a: torch.Tensor, b: torch.Tensor, row_index, column_index, pairs_per_chunk: int) -> torch.Tensor:
    # Local means and second moments belong to single images, so they are
    # computed once per image; only the cross term needs every pair.
    statistics_a = _ssim_statistics(a, SSIM_WINDOW_SIZE, SSIM_SIGMA)
    statistics_b = _ssim_statistics(b, SSIM_WINDOW_SIZE, SSIM_SIGMA)
    result = torch.empty(row_index.numel(), dtype=torch.float64)
    for start in range(0, row_index.numel(), pairs_per_chunk):
        rows = row_index[start : start + pairs_per_chunk]
        columns = column_index[start : start + pairs_per_chunk]
        result[start : start + pairs_per_chunk] = _ssim_from_statistics(
            _select_statistics(statistics_a, rows),
            _select_statistics(statistics_b, columns),
            SSIM_WINDOW_SIZE,
            SSIM_SIGMA,
            1.0,
        ).cpu()
    return result


def _select_statistics(statistics: _SsimStatistics, index: torch.Tensor) -> _SsimStatistics:
    return _SsimStatistics(statistics.images[index], statistics.mean[index], statistics.second_moment[index])


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


def _unit_centred(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(_centre(images.flatten(1).to(torch.float64)), dim=1, eps=1e-12)


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
    """Compute the pixel-metric similarity of every pair ``(a[i], b[j])``; returns ``[len(a), len(b)]`` in float64.

    SSIM pairs are evaluated in chunks of ``pairs_per_chunk`` to bound memory.
    Cosine and MAE reduce to one matrix product and one L1 distance matrix.
    """
    _pair_function(metric)
    _check_same_image_shape(a, b)
    if pairs_per_chunk < 1:
        raise ValueError(f"pairs_per_chunk must be at least 1, got {pairs_per_chunk}")

    if metric == "pixel_cosine":
        return (_unit_centred(a) @ _unit_centred(b).T).cpu()
    if metric == "mae":
        distance = torch.cdist(a.flatten(1).to(torch.float64), b.flatten(1).to(torch.float64), p=1.0)
        return (1.0 - distance / a.shape[1:].numel()).cpu()

    rows, columns = a.shape[0], b.shape[0]
    row_index = torch.arange(rows).repeat_interleave(columns)
    column_index = torch.arange(columns).repeat(rows)
    return _ssim_matrix(a, b, row_index, column_index, pairs_per_chunk).reshape(rows, columns)


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
