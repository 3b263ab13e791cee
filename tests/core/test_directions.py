import pytest
import torch
from safetensors.torch import save_file

from loco_core import (
    DirectionSet,
    JacobianProducts,
    LocoError,
    compose,
    find_directions,
    leakage,
    principal_angle_sine,
    project_out,
    text_direction,
    transfer,
)
from loco_core.closed_form import GaussianMixture, low_rank_mixture, regional_gaussian

SHAPE = (3, 8, 8)
SIGMA = 0.6


def region_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8)
    mask[1:5, 2:7] = 1
    return mask


def regional_model(seed: int = 0) -> GaussianMixture:
    return regional_gaussian(
        SHAPE, region_mask(), inside_rank=4, outside_rank=4, shared_rank=3, seed=seed, shared_variance=1.5
    )


def exact_local_directions(model, x, mask, rank, null_rank):
    """Steps 2 and 3 of LOCO computed densely from the closed-form Jacobian."""
    jacobian = model.jacobian(x, SIGMA)
    rows = mask.expand(SHAPE).reshape(-1).to(torch.float64)
    edit = torch.linalg.svd(rows[:, None] * jacobian).Vh[:rank]
    null = torch.linalg.svd((1 - rows)[:, None] * jacobian).Vh[:null_rank]
    local = project_out(edit, null)
    inside = (rows[:, None] * (jacobian @ local.T)).norm(dim=0)
    outside = ((1 - rows)[:, None] * (jacobian @ local.T)).norm(dim=0)
    return local, outside / inside


def test_null_projection_cuts_leakage_as_predicted():
    model = regional_model()
    x = model.sample(1, seed=3)

    # The null rank covers the outside and shared directions (4 + 3), so the
    # closed form predicts leakage at the level of the isotropic floor.
    found = find_directions(JacobianProducts(model, x, SIGMA), region_mask(), rank=3, null_rank=7, tolerance=1e-7, max_rounds=80)
    expected_vectors, expected_leakage = exact_local_directions(model, x, region_mask(), rank=3, null_rank=7)

    assert principal_angle_sine(expected_vectors.T, found.vectors.reshape(3, -1).T) < 1e-4
    torch.testing.assert_close(found.leakage_after, expected_leakage, rtol=1e-3, atol=1e-6)
    assert float(found.leakage_after.max()) < 0.1 * float(found.leakage_before.max())


def test_found_directions_are_orthonormal_and_local():
    model = regional_model()
    x = model.sample(1, seed=4)

    found = find_directions(JacobianProducts(model, x, SIGMA), region_mask(), rank=3, null_rank=5)

    flat = found.vectors.reshape(3, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.isfinite(found.vectors).all()
    assert found.parameters["edit_subspace"]["converged"]
    assert found.parameters["null_subspace"]["converged"]


def test_linear_response_matches_jvp():
    # D(x + lambda v) - D(x) = lambda J v exactly for a Gaussian and up to
    # O(lambda^2) for a mixture, whose posterior mean is nonlinear.
    mixture = low_rank_mixture(SHAPE, components=3, rank=5, seed=5, mean_scale=0.05)
    x = mixture.sample(1, seed=0) + SIGMA * torch.randn(1, *SHAPE, dtype=torch.float64)
    products = JacobianProducts(mixture, x, SIGMA)
    direction = find_directions(products, region_mask(), rank=1, null_rank=0).vectors
    predicted = products.jvp(direction)

    errors = []
    for strength in (0.4, 0.1, 0.025):
        change = products.evaluate(x + strength * direction) - products.value()
        errors.append(float((change - strength * predicted).norm() / (strength * predicted).norm()))

    assert errors[2] < 0.05
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 8
    cosine = torch.nn.functional.cosine_similarity(
        (products.evaluate(x + 0.4 * direction) - products.value()).flatten(), predicted.flatten(), dim=0
    )
    assert float(cosine) > 0.96


def test_direction_set_save_load_round_trip(tmp_path):
    model = regional_model()
    found = find_directions(JacobianProducts(model, model.sample(1, seed=1), SIGMA), region_mask(), rank=2, null_rank=3, model_fingerprint="closed-form:1")

    path = found.save(tmp_path / "directions.safetensors")
    loaded = DirectionSet.load(path)

    torch.testing.assert_close(loaded.vectors, found.vectors.float())
    torch.testing.assert_close(loaded.leakage_after, found.leakage_after.float())
    assert loaded.sigma == pytest.approx(found.sigma)
    assert loaded.model_fingerprint == "closed-form:1"
    assert loaded.parameters == found.parameters
    assert loaded.shape == SHAPE


def test_save_never_overwrites(tmp_path):
    model = regional_model()
    found = find_directions(JacobianProducts(model, model.sample(1, seed=1), SIGMA), region_mask(), rank=1, null_rank=0)
    path = tmp_path / "directions.safetensors"
    path.write_bytes(b"user data")

    with pytest.raises(LocoError, match="already exists"):
        found.save(path)
    assert path.read_bytes() == b"user data"


def test_load_rejects_other_files(tmp_path):
    foreign = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(LocoError, match="not a LOCO direction file"):
        DirectionSet.load(foreign)
    pickle_path = tmp_path / "directions.pt"
    pickle_path.write_bytes(b"\x80\x04")
    with pytest.raises(LocoError, match="not a .safetensors file"):
        DirectionSet.load(pickle_path)
    with pytest.raises(LocoError, match="not found"):
        DirectionSet.load(tmp_path / "missing.safetensors")


def test_compose_is_weighted_sum():
    first, second = torch.randn(2, *SHAPE).unbind(0)
    torch.testing.assert_close(compose([first, second], [2.0, -0.5]), 2.0 * first - 0.5 * second)
    with pytest.raises(LocoError, match="one weight each"):
        compose([first, second], [1.0])
    with pytest.raises(LocoError, match="same size"):
        compose([first, torch.zeros(3, 4, 4)], [1.0, 1.0])


def test_transfer_reprojects_onto_target():
    model = regional_model()
    source = model.sample(1, seed=1)
    target = model.sample(1, seed=2)
    found = find_directions(JacobianProducts(model, source, SIGMA), region_mask(), rank=3, null_rank=0)
    raw = found.vectors[0]

    target_products = JacobianProducts(model, target, SIGMA)
    moved, moved_leakage = transfer(raw, target_products, region_mask(), null_rank=5, tolerance=1e-6)
    raw_leakage = leakage(target_products, raw[None], region_mask())[0]

    assert float(moved.norm()) == pytest.approx(1.0)
    assert float(moved_leakage) < 0.5 * float(raw_leakage)
    assert float(torch.dot(moved.flatten(), raw.flatten())) > 0.5


def test_text_direction_matches_closed_form():
    # Source and edit models differ in their mean inside the region, as a
    # prompt change would; the T-LOCO direction is J_edit^T P (D_edit - D_src).
    source_model = regional_model()
    shifted = source_model.means.clone()
    shifted[0] += 0.5 * region_mask().expand(SHAPE).reshape(-1).to(torch.float64)
    edit_model = GaussianMixture(shifted, source_model.covariances, source_model.weights, SHAPE)
    x = source_model.sample(1, seed=5) + SIGMA * torch.randn(1, *SHAPE, dtype=torch.float64)

    direction, _ = text_direction(
        JacobianProducts(source_model, x, SIGMA), JacobianProducts(edit_model, x, SIGMA), region_mask()
    )

    rows = region_mask().expand(SHAPE).reshape(-1).to(torch.float64)
    change = rows * (edit_model.denoise(x, torch.tensor([SIGMA])) - source_model.denoise(x, torch.tensor([SIGMA]))).reshape(-1)
    expected = edit_model.jacobian(x, SIGMA).T @ change
    expected = expected / expected.norm()
    torch.testing.assert_close(direction.reshape(-1), expected, rtol=1e-5, atol=1e-8)


def test_text_direction_rejects_identical_prompts():
    model = regional_model()
    x = model.sample(1, seed=5)
    with pytest.raises(LocoError, match="same image"):
        text_direction(JacobianProducts(model, x, SIGMA), JacobianProducts(model, x, SIGMA), region_mask())


def test_full_mask_with_null_rank_raises():
    model = regional_model()
    products = JacobianProducts(model, model.sample(1, seed=1), SIGMA)
    with pytest.raises(LocoError, match="whole image"):
        find_directions(products, torch.ones(8, 8), rank=2, null_rank=3)
    global_directions = find_directions(products, torch.ones(8, 8), rank=2, null_rank=0)
    assert global_directions.rank == 2


def test_null_rank_too_high_raises_early():
    # One unmasked pixel gives an outside region of 3 entries (three channels).
    model = regional_model()
    products = JacobianProducts(model, model.sample(1, seed=1), SIGMA)
    mask = torch.ones(8, 8)
    mask[5, 5] = 0

    with pytest.raises(LocoError, match="null_rank=5 exceeds the dimension 3 of the region outside the mask"):
        find_directions(products, mask, rank=2, null_rank=5)
    with pytest.raises(LocoError, match="null_rank=5 exceeds"):
        transfer(torch.randn(3, 8, 8, dtype=torch.float64), products, mask, null_rank=5)
    assert products.counter.forward_equivalents() == 0


def test_direction_index_out_of_range_raises():
    model = regional_model()
    found = find_directions(JacobianProducts(model, model.sample(1, seed=1), SIGMA), region_mask(), rank=2, null_rank=0)
    with pytest.raises(LocoError, match="0..1"):
        found.direction(2)
