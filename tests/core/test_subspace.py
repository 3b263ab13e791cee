import pytest
import torch

from loco_core import JacobianProducts, LocoError, masked_subspace, principal_angle_sine
from loco_core.closed_form import low_rank_gaussian, low_rank_mixture
from loco_core.subspace import canonical_signs

SHAPE = (3, 8, 8)
SIGMA = 0.5


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1
    return mask


def exact_subspace(model, x, mask, rank):
    """Top right singular vectors and values of P J from the closed-form Jacobian."""
    jacobian = model.jacobian(x, SIGMA)
    rows = mask.expand(SHAPE).reshape(-1).to(torch.float64)
    _, values, right = torch.linalg.svd(rows[:, None] * jacobian)
    return right[:rank].T, values[:rank]


@pytest.mark.parametrize(
    "model",
    [
        low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3),
        low_rank_mixture(SHAPE, components=3, rank=6, seed=1, mean_scale=0.3),
    ],
    ids=["gaussian", "mixture"],
)
def test_subspace_matches_closed_form(model):
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = centre_mask()
    expected_vectors, expected_values = exact_subspace(model, x, mask, rank=3)

    found = masked_subspace(JacobianProducts(model, x, SIGMA), mask, rank=3, tolerance=1e-6, max_rounds=60)

    assert found.record.converged
    assert principal_angle_sine(expected_vectors, found.vectors.reshape(3, -1).T) <= 1e-3
    torch.testing.assert_close(found.singular_values, expected_values, rtol=1e-6, atol=0)


def test_vectors_are_orthonormal_and_repeatable():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    x = torch.randn(1, *SHAPE, dtype=torch.float64)

    first = masked_subspace(JacobianProducts(model, x, SIGMA), centre_mask(), rank=4, seed=7)
    second = masked_subspace(JacobianProducts(model, x, SIGMA), centre_mask(), rank=4, seed=7)

    flat = first.vectors.reshape(4, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.equal(first.vectors, second.vectors)


def test_record_counts_products():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    products = JacobianProducts(model, torch.randn(1, *SHAPE, dtype=torch.float64), SIGMA, jvp_strategy="forward")

    found = masked_subspace(products, centre_mask(), rank=2, oversample=3, tolerance=1e-4)

    block = 5
    record = found.record
    assert record.jvp_vectors == block * record.rounds
    assert record.vjp_vectors == block * (record.rounds - 1)
    assert record.forward_equivalents == 2 * (record.jvp_vectors + record.vjp_vectors)
    assert len(record.angle_changes) == record.rounds - 1
    assert record.converged
    assert record.last_angle_change <= 1e-4


def test_warm_start_converges_in_two_rounds():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    cold = masked_subspace(JacobianProducts(model, x, SIGMA), centre_mask(), rank=3, tolerance=1e-5, max_rounds=60)

    warm = masked_subspace(
        JacobianProducts(model, x, SIGMA), centre_mask(), rank=3, tolerance=1e-5, warm_start=cold.vectors
    )

    assert cold.record.rounds > 3
    assert warm.record.rounds == 2
    assert principal_angle_sine(cold.vectors.reshape(3, -1).T, warm.vectors.reshape(3, -1).T) < 1e-4


def test_principal_angle_ignores_signs_and_order():
    basis, _ = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64))
    flipped = basis[:, [2, 0, 3, 1]] * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    other, _ = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64))

    assert principal_angle_sine(basis, flipped) < 1e-12
    assert principal_angle_sine(basis, other) > 0.5


def test_principal_angle_accepts_image_blocks():
    basis, _ = torch.linalg.qr(torch.randn(48, 3, dtype=torch.float64))
    other, _ = torch.linalg.qr(torch.randn(48, 3, dtype=torch.float64))
    as_images = basis.T.reshape(3, 3, 4, 4)

    assert principal_angle_sine(as_images, other.T.reshape(3, 3, 4, 4)) == pytest.approx(principal_angle_sine(basis, other))
    assert principal_angle_sine(as_images, basis) < 1e-12


def test_canonical_signs_make_largest_entry_positive():
    vectors = torch.tensor([[0.1, -0.9, 0.2], [0.5, 0.1, -0.3]])
    fixed = canonical_signs(vectors)
    torch.testing.assert_close(fixed, torch.tensor([[-0.1, 0.9, -0.2], [0.5, 0.1, -0.3]]))


def test_round_callback_can_stop_iteration():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    products = JacobianProducts(model, torch.randn(1, *SHAPE, dtype=torch.float64), SIGMA)
    rounds_seen = []

    def interrupt_after_first(round_index, max_rounds, change):
        rounds_seen.append(round_index)
        raise KeyboardInterrupt("user interrupt")

    with pytest.raises(KeyboardInterrupt):
        masked_subspace(products, centre_mask(), rank=2, on_round=interrupt_after_first)
    assert rounds_seen == [1]
    assert products.counter.vjp == 0


@pytest.mark.parametrize(
    ("mask", "rank", "message"),
    [
        (torch.zeros(8, 8), 2, "empty"),
        (torch.ones(5, 5), 2, "does not match"),
        (torch.full((8, 8), 2.0), 2, r"\[0, 1\]"),
        (torch.full((8, 8), float("nan")), 2, "NaN"),
        (torch.nn.functional.pad(torch.ones(1, 1), (0, 7, 0, 7)), 4, "exceeds the masked dimension 3"),
        (torch.ones(8, 8), 0, "at least one"),
    ],
    ids=["empty", "shape", "range", "nan", "rank-too-high", "rank-zero"],
)
def test_bad_masks_and_ranks_raise(mask, rank, message):
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    products = JacobianProducts(model, torch.randn(1, *SHAPE, dtype=torch.float64), SIGMA)
    with pytest.raises(LocoError, match=message):
        masked_subspace(products, mask, rank=rank)


def test_mask_ranks_accepted():
    model = low_rank_gaussian(SHAPE, rank=12, seed=0, floor=1e-3)
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    results = []
    for mask in (centre_mask(), centre_mask()[None], centre_mask()[None, None], centre_mask().expand(SHAPE)):
        found = masked_subspace(JacobianProducts(model, x, SIGMA), mask, rank=2, seed=1)
        results.append(found.vectors)
    for other in results[1:]:
        assert torch.equal(results[0], other)
