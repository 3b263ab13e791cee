"""LOCO with the mask in a decoder's output space: f(x) = W D(x), where W maps the latent to a larger image.

W is linear (nearest-neighbour upsampling by 2, then a fixed convolution),
so the Jacobian of f is exactly W times the closed-form Jacobian of D, and
every result can be checked against a dense SVD.
"""

import pytest
import torch

from loco_core import JacobianProducts, LocoError, find_directions, masked_subspace, principal_angle_sine, transfer
from loco_core.closed_form import low_rank_gaussian, regional_gaussian
from loco_core.errors import JacobianError

SHAPE = (3, 8, 8)
OUTPUT_SHAPE = (3, 16, 16)
SIGMA = 0.5


class LinearDecoder:
    """Upsample by 2 and mix with a seeded convolution: a stand-in for a VAE decoder."""

    def __init__(self, seed: int = 5, kernel_size: int = 3):
        generator = torch.Generator().manual_seed(seed)
        self.kernel = torch.randn(3, 3, kernel_size, kernel_size, generator=generator, dtype=torch.float64) / 3

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        upsampled = torch.nn.functional.interpolate(latent, scale_factor=2, mode="nearest")
        return torch.nn.functional.conv2d(upsampled, self.kernel.to(latent.dtype), padding=self.kernel.shape[-1] // 2)

    def dense(self) -> torch.Tensor:
        """Return the matrix of the map, [output entries, input entries]."""
        basis = torch.eye(torch.Size(SHAPE).numel(), dtype=torch.float64).reshape(-1, *SHAPE)
        return self(basis).reshape(basis.shape[0], -1).T


def decoded_model(model, decoder):
    return lambda x, sigma: decoder(model(x, sigma))


def latent_region() -> torch.Tensor:
    region = torch.zeros(8, 8)
    region[1:5, 2:6] = 1
    return region


def upper_left_mask() -> torch.Tensor:
    """The latent region seen in the decoded image."""
    return latent_region().repeat_interleave(2, 0).repeat_interleave(2, 1)


def dense_jacobian(model, decoder, x) -> torch.Tensor:
    return decoder.dense() @ model.jacobian(x, SIGMA)


def setup():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    decoder = LinearDecoder()
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    products = JacobianProducts(decoded_model(model, decoder), x, SIGMA, output_shape=OUTPUT_SHAPE)
    return model, decoder, x, products


def test_decoder_subspace_matches_dense_svd():
    model, decoder, x, products = setup()
    rows = upper_left_mask().expand(OUTPUT_SHAPE).reshape(-1).to(torch.float64)
    _, values, right = torch.linalg.svd(rows[:, None] * dense_jacobian(model, decoder, x))

    found = masked_subspace(products, upper_left_mask(), rank=3, tolerance=1e-7, max_rounds=80)

    assert found.record.converged
    assert found.vectors.shape == (3, *SHAPE)
    assert principal_angle_sine(right[:3].T, found.vectors.reshape(3, -1).T) <= 1e-3
    torch.testing.assert_close(found.singular_values, values[:3], rtol=1e-6, atol=0)
    assert products.strategies == {"jvp": "forward", "vjp": "reverse"}


def test_decoder_leakage_matches_dense():
    # Variation partly confined to the region and partly shared with the
    # rest. The null rank covers the outside and shared directions (4 + 3).
    # A 1x1 kernel keeps the region's border sharp in the decoded image, so
    # the projection can remove nearly all leakage.
    model = regional_gaussian(SHAPE, latent_region(), inside_rank=4, outside_rank=4, shared_rank=3, seed=0, shared_variance=1.5)
    decoder = LinearDecoder(kernel_size=1)
    x = model.sample(1, seed=3)
    products = JacobianProducts(decoded_model(model, decoder), x, SIGMA, output_shape=OUTPUT_SHAPE)
    found = find_directions(products, upper_left_mask(), rank=2, null_rank=7, tolerance=1e-7, max_rounds=80)

    jacobian = dense_jacobian(model, decoder, x)
    inside = upper_left_mask().expand(OUTPUT_SHAPE).reshape(-1).to(torch.float64)
    response = jacobian @ found.vectors.reshape(2, -1).T
    expected = (((1 - inside)[:, None] * response).norm(dim=0)) / ((inside[:, None] * response).norm(dim=0))

    torch.testing.assert_close(found.leakage_after, expected, rtol=1e-8, atol=0)
    assert float(found.leakage_after.max()) < 0.1 * float(found.leakage_before.min())
    assert found.mask.shape == OUTPUT_SHAPE


def test_transfer_through_decoder_keeps_input_shape():
    model, decoder, x, products = setup()
    found = find_directions(products, upper_left_mask(), rank=2, null_rank=2)
    other = JacobianProducts(decoded_model(model, decoder), -x, SIGMA, output_shape=OUTPUT_SHAPE)

    moved, moved_leakage = transfer(found.vectors, other, upper_left_mask(), null_rank=2)

    assert moved.shape == (2, *SHAPE)
    assert moved_leakage.shape == (2,)
    torch.testing.assert_close(moved.reshape(2, -1).norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_input_sized_mask_raises():
    _, _, _, products = setup()
    with pytest.raises(LocoError, match="does not match"):
        masked_subspace(products, torch.ones(8, 8), rank=2)


def test_symmetric_vjp_needs_a_square_jacobian():
    model, decoder, x, _ = setup()
    with pytest.raises(LocoError, match="symmetric"):
        JacobianProducts(decoded_model(model, decoder), x, SIGMA, vjp_strategy="symmetric", output_shape=OUTPUT_SHAPE)


def test_reverse_failure_skips_symmetric_fallback():
    # Weights made inside inference mode cannot be saved for backward, so
    # reverse mode fails. A square Jacobian would fall back, this one must not.
    with torch.inference_mode():
        layer = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    decoder = LinearDecoder()
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    products = JacobianProducts(lambda z, sigma: decoder(layer(z)), x, SIGMA, output_shape=OUTPUT_SHAPE)

    with pytest.raises(JacobianError, match="cannot replace it"):
        products.vjp(torch.randn(1, *OUTPUT_SHAPE, dtype=torch.float64))


def test_rank_above_input_dimension_raises():
    model, decoder, _, _ = setup()
    tiny = torch.randn(1, 1, 1, 1, dtype=torch.float64)
    products = JacobianProducts(lambda z, sigma: z.expand(-1, 1, 2, 2) * 2, tiny, SIGMA, output_shape=(1, 2, 2))
    with pytest.raises(LocoError, match="exceeds the dimension 1"):
        masked_subspace(products, torch.ones(2, 2), rank=2)
