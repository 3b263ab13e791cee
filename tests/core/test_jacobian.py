import logging

import pytest
import torch

from loco_core import JacobianError, JacobianProducts, LocoError, saveable_weights
from networks import build_denoiser, dense_jacobian

SIGMA = 0.9
SHAPE = (3, 6, 6)
# Float32 rounding over a few hundred terms; finite differences also carry
# their truncation error, which is larger.
TOLERANCES = {
    torch.float32: {"exact": 2e-6, "finite_difference": 2e-4},
    torch.float64: {"exact": 1e-12, "finite_difference": 1e-6},
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture
def vectors():
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", ["forward", "double_vjp", "finite_difference"])
def test_jvp_strategy_matches_dense_jacobian(dtype, strategy, vectors):
    model = build_denoiser(0, dtype)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    jacobian = dense_jacobian(model, x, SIGMA)
    block = vectors.to(dtype)

    products = JacobianProducts(model, x, SIGMA, jvp_strategy=strategy)
    result = products.jvp(block).reshape(4, -1)

    expected = block.reshape(4, -1) @ jacobian.T
    kind = "finite_difference" if strategy == "finite_difference" else "exact"
    assert relative_error(result, expected) < TOLERANCES[dtype][kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vjp_matches_dense_jacobian(dtype, vectors):
    model = build_denoiser(0, dtype)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    jacobian = dense_jacobian(model, x, SIGMA)
    block = vectors.to(dtype)

    result = JacobianProducts(model, x, SIGMA).vjp(block).reshape(4, -1)

    expected = block.reshape(4, -1) @ jacobian
    assert relative_error(result, expected) < TOLERANCES[dtype]["exact"]


def test_products_inside_inference_mode(vectors):
    reference_model = build_denoiser(0)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    jacobian = dense_jacobian(reference_model, x, SIGMA)
    expected_jvp = vectors.reshape(4, -1) @ jacobian.T
    expected_vjp = vectors.reshape(4, -1) @ jacobian

    with torch.inference_mode():
        model = build_denoiser(0)
        inference_x = x.clone()
        assert next(model.parameters()).is_inference()

        forward = JacobianProducts(model, inference_x, SIGMA, jvp_strategy="forward").jvp(vectors)
        finite = JacobianProducts(model, inference_x, SIGMA, jvp_strategy="finite_difference").jvp(vectors)
        with saveable_weights(model):
            reverse = JacobianProducts(model, inference_x, SIGMA).vjp(vectors)
        restored = all(p.is_inference() for p in model.parameters())

    assert relative_error(forward.reshape(4, -1), expected_jvp) < TOLERANCES[torch.float32]["exact"]
    assert relative_error(finite.reshape(4, -1), expected_jvp) < TOLERANCES[torch.float32]["finite_difference"]
    assert relative_error(reverse.reshape(4, -1), expected_vjp) < TOLERANCES[torch.float32]["exact"]
    assert restored


def test_reverse_mode_on_inference_weights_raises(vectors):
    with torch.inference_mode():
        model = build_denoiser(0)
        products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA, vjp_strategy="reverse")
        with pytest.raises(JacobianError, match="saveable_weights"):
            products.vjp(vectors)


def test_auto_vjp_falls_back_to_symmetric(vectors, caplog):
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="loco_core.jacobian"):
        model = build_denoiser(0)
        products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA)
        result = products.vjp(vectors)
        expected = products.jvp(vectors)

    assert torch.equal(result, expected)
    assert products.strategies == {"jvp": "forward", "vjp": "symmetric"}
    assert "symmetric approximation" in caplog.text


def test_auto_falls_back_from_fused_attention(vectors, caplog):
    # The fused attention kernel has neither forward AD nor a double backward
    # on the CPU, so both autograd strategies fail and the log gives the reasons.
    model = build_denoiser(0, fused_attention=True)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    expected = vectors.reshape(4, -1) @ dense_jacobian(model, x, SIGMA).T

    with caplog.at_level(logging.WARNING, logger="loco_core.jacobian"):
        products = JacobianProducts(model, x, SIGMA)
        result = products.jvp(vectors)

    assert products._resolved_jvp == "finite_difference"
    assert "falls back to finite_difference" in caplog.text
    assert "forward: " in caplog.text
    assert "double_vjp: " in caplog.text
    assert relative_error(result.reshape(4, -1), expected) < TOLERANCES[torch.float32]["finite_difference"]


def test_auto_prefers_double_vjp_when_forward_mode_fails(vectors, caplog):
    model = build_denoiser(0)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    expected = vectors.reshape(4, -1) @ dense_jacobian(model, x, SIGMA).T

    def no_forward_mode(z, sigma):
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            raise NotImplementedError("this denoiser has no forward-mode AD")
        return model(z, sigma)

    with caplog.at_level(logging.WARNING, logger="loco_core.jacobian"):
        products = JacobianProducts(no_forward_mode, x, SIGMA)
        result = products.jvp(vectors)

    assert products._resolved_jvp == "double_vjp"
    assert "no forward-mode AD" in caplog.text
    assert relative_error(result.reshape(4, -1), expected) < TOLERANCES[torch.float32]["exact"]


def test_auto_in_inference_mode_reaches_finite_differences(vectors, caplog):
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="loco_core.jacobian"):
        model = build_denoiser(0, fused_attention=True)
        products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA)
        result = products.jvp(vectors)

    assert products._resolved_jvp == "finite_difference"
    assert "double_vjp" in caplog.text
    assert bool(torch.isfinite(result).all())


def test_explicit_forward_on_fused_attention_raises(vectors):
    model = build_denoiser(0, fused_attention=True)
    with torch.no_grad():
        products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA, jvp_strategy="forward")
        with pytest.raises(JacobianError, match="jvp_strategy='auto'"):
            products.jvp(vectors)


def test_zero_product_raises(vectors):
    def constant_denoiser(x, sigma):
        return torch.zeros_like(x) + 0.5

    products = JacobianProducts(constant_denoiser, torch.randn(1, *SHAPE), SIGMA, jvp_strategy="finite_difference")
    with pytest.raises(JacobianError, match="zero product"):
        products.jvp(vectors)


def test_non_finite_product_raises(vectors):
    def exploding_denoiser(x, sigma):
        return x / (x - x)

    products = JacobianProducts(exploding_denoiser, torch.randn(1, *SHAPE), SIGMA, jvp_strategy="finite_difference")
    with pytest.raises(JacobianError, match="NaN or infinite"):
        products.jvp(vectors)


def test_symmetric_vjp_uses_jvp(vectors):
    model = build_denoiser(0)
    products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA, vjp_strategy="symmetric")
    assert torch.equal(products.vjp(vectors), products.jvp(vectors))


def test_counter_counts_vectors(vectors):
    products = JacobianProducts(build_denoiser(0), torch.randn(1, *SHAPE), SIGMA, jvp_strategy="forward")
    products.jvp(vectors)
    products.vjp(vectors[:2])
    products.value()

    assert (products.counter.jvp, products.counter.vjp, products.counter.forward) == (4, 2, 1)
    assert products.counter.forward_equivalents() == 1 + 2 * 4 + 2 * 2


def test_rejects_bad_arguments(vectors):
    model = build_denoiser(0)
    with pytest.raises(LocoError, match="jvp_strategy"):
        JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA, jvp_strategy="magic")
    with pytest.raises(LocoError, match="batch axis of 1"):
        JacobianProducts(model, torch.randn(2, *SHAPE), SIGMA)
    with pytest.raises(LocoError, match="NaN"):
        JacobianProducts(model, torch.full((1, *SHAPE), float("nan")), SIGMA)
    with pytest.raises(LocoError, match="sigma"):
        JacobianProducts(model, torch.randn(1, *SHAPE), -1.0)
    products = JacobianProducts(model, torch.randn(1, *SHAPE), SIGMA)
    with pytest.raises(LocoError, match="shape"):
        products.jvp(torch.randn(2, 3, 5, 5))
