"""Spectral residual salience, foreground masks and MASK layouts."""

import pytest
import torch

from loco_core.salience import (
    background_salience_share,
    gaussian_blur,
    mask_from_salience,
    normalize_mask,
    spectral_residual_salience,
    to_grayscale,
)


def square_on_plain_background(size: int = 48, side: int = 8, top: int = 10, left: int = 30) -> torch.Tensor:
    image = torch.full((1, 3, size, size), 0.4)
    image[:, :, top : top + side, left : left + side] = 0.9
    return image


def test_salience_peaks_on_the_object():
    image = square_on_plain_background()
    salience = spectral_residual_salience(image)

    object_mask = torch.zeros(1, 48, 48)
    object_mask[:, 6:22, 26:42] = 1.0  # the square with a 4-pixel margin for the blur
    assert salience.shape == (1, 48, 48)
    assert salience.max().item() == pytest.approx(1.0)
    peak = torch.nonzero(salience[0] == salience[0].max())[0]
    assert object_mask[0, peak[0], peak[1]] == 1
    # The object covers 11% of the area but most of the salience.
    assert background_salience_share(salience, object_mask).item() < 0.5


def test_salience_of_large_image_uses_work_size():
    image = torch.nn.functional.interpolate(square_on_plain_background(), size=(256, 256), mode="nearest")
    salience = spectral_residual_salience(image, work_size=64)

    assert salience.shape == (1, 256, 256)
    assert torch.isfinite(salience).all()


def test_salience_gradient_is_finite():
    image = square_on_plain_background().requires_grad_(True)
    salience = spectral_residual_salience(image)
    salience[..., :20, :20].sum().backward()

    assert torch.isfinite(image.grad).all()
    assert image.grad.abs().sum() > 0


def test_grayscale_rejects_alpha_channel():
    with pytest.raises(ValueError, match="alpha"):
        to_grayscale(torch.rand(1, 4, 8, 8))


def test_gaussian_blur_preserves_constant_map():
    maps = torch.full((2, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(maps, 1.5), maps)


def test_top_fraction_mask_selects_that_many_pixels():
    salience = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    mask = mask_from_salience(salience, top_fraction=0.25)

    assert mask.sum().item() == 25
    assert mask.flatten()[75:].eq(1).all()


def test_threshold_mask_uses_scaled_map():
    salience = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    mask = mask_from_salience(salience, threshold=0.5)

    assert torch.equal(mask, torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))


def test_mask_from_salience_needs_exactly_one_rule():
    salience = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        mask_from_salience(salience)
    with pytest.raises(ValueError, match="exactly one"):
        mask_from_salience(salience, threshold=0.5, top_fraction=0.2)
    with pytest.raises(ValueError, match="top_fraction"):
        mask_from_salience(salience, top_fraction=0.0)


def test_background_share_of_uniform_map_is_area_fraction():
    salience = torch.ones(1, 10, 10)
    foreground = torch.zeros(1, 10, 10)
    foreground[:, :3] = 1.0

    assert background_salience_share(salience, foreground).item() == pytest.approx(0.7)


@pytest.mark.parametrize("shape", [(6, 8), (1, 6, 8), (3, 6, 8), (3, 1, 6, 8), (1, 1, 6, 8)])
def test_normalize_mask_accepts_comfy_layouts(shape):
    mask = torch.rand(shape)
    normalized = normalize_mask(mask, batch=3, height=6, width=8)

    assert normalized.shape == (3, 6, 8)
    assert torch.equal(normalized[0], mask.reshape(-1, 6, 8)[0])


def test_normalize_mask_returns_copy():
    mask = torch.rand(3, 6, 8)
    normalized = normalize_mask(mask, batch=3, height=6, width=8)
    normalized.zero_()

    assert mask.abs().sum() > 0


@pytest.mark.parametrize(
    "shape,message",
    [((6, 9), "resize"), ((2, 6, 8), "mask batch"), ((3, 2, 6, 8), r"\[B, 1, H, W\]"), ((1, 1, 1, 6, 8), "mask must be")],
)
def test_normalize_mask_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        normalize_mask(torch.rand(shape), batch=3, height=6, width=8)


def test_normalize_mask_rejects_values_outside_unit_range():
    with pytest.raises(ValueError, match="0..1"):
        normalize_mask(torch.full((6, 8), 1.5), batch=1, height=6, width=8)
