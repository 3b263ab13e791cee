"""Jacobian-vector (JVP) and vector-Jacobian (VJP) products of a denoiser.

All k vectors of a block go through the denoiser in one batched call: the
image is repeated k times along the batch axis and each copy carries one
tangent or cotangent.

JVP strategies, tried in this order by "auto":
  forward            torch.func.jvp; needs no change to the weights, so it works
                     when the caller sits inside torch.inference_mode() and the
                     weights are inference tensors.
  double_vjp         J v as the VJP of u -> J^T u; needs reverse mode.
  finite_difference  (D(x + h v) - D(x - h v)) / 2h in at least float32,
                     with h = 1e-3 * |x| / |v|.
VJP strategies: reverse (torch.autograd) and symmetric (J u in place of
J^T u, exact for the true posterior mean, whose Jacobian is symmetric).
"auto" uses reverse and falls back to symmetric with a logged warning.
Reverse mode saves the weights for the backward pass, and PyTorch cannot save
inference tensors. A caller whose weights are inference tensors must make
them saveable first, for example with ``saveable_weights(module)`` below, or
by cloning them outside inference mode. In-place edits of activations by
model patches (ComfyUI's ControlNet adds its residuals with +=) also break
reverse mode but not forward mode; a stock ControlNet's own weights are
inference tensors too, so with one attached "auto" ends at symmetric.

A zero or non-finite product raises JacobianError: the published LOCO code
calls torch.autograd.functional.jacobian, which returns zeros without an error
inside inference mode.
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from .denoiser import Denoiser, check_finite, sigma_batch
from .errors import JacobianError, LocoError

logger = logging.getLogger(__name__)

JVP_STRATEGIES = ("auto", "forward", "double_vjp", "finite_difference")
VJP_STRATEGIES = ("auto", "reverse", "symmetric")

# Relative step of central finite differences: about the cube root of float32
# machine epsilon, which balances truncation and rounding error.
FINITE_DIFFERENCE_STEP = 1e-3


@dataclass
class ProductCounter:
    """Number of vectors pushed through each kind of product, and plain evaluations."""

    forward: int = 0
    jvp: int = 0
    vjp: int = 0

    def forward_equivalents(self) -> int:
        """Cost in denoiser evaluations: a JVP or a VJP counts as two forward passes.

        The weight of two is the usual estimate for one product, a primal and
        a tangent or adjoint pass. Both methods in a comparison are counted
        the same way.
        """
        return self.forward + 2 * self.jvp + 2 * self.vjp


class JacobianProducts:
    """Products with the Jacobian J of a denoiser at one image x and noise level sigma.

    ``x`` has shape [1, ...]; JVP vectors have shape [k, ...]. The function
    may map into another space than its input (for example a denoiser
    followed by a VAE decoder); then ``output_shape`` names the shape of one
    output, VJP cotangents have shape [k, *output_shape], and the symmetric
    VJP, which needs a square Jacobian, is unavailable.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigma: float,
        jvp_strategy: str = "auto",
        vjp_strategy: str = "auto",
        output_shape: tuple[int, ...] | None = None,
    ):
        if jvp_strategy not in JVP_STRATEGIES:
            raise LocoError(f"jvp_strategy={jvp_strategy!r} is unknown; use one of {JVP_STRATEGIES}")
        if vjp_strategy not in VJP_STRATEGIES:
            raise LocoError(f"vjp_strategy={vjp_strategy!r} is unknown; use one of {VJP_STRATEGIES}")
        if x.ndim < 2 or x.shape[0] != 1:
            raise LocoError(f"x must hold one image with a batch axis of 1, got shape {tuple(x.shape)}")
        check_finite("x", x)

        self.denoiser = denoiser
        self.x = x.detach()
        self.sigma = float(sigma_batch(sigma, 1, x.to(torch.float64))[0])
        self.jvp_strategy = jvp_strategy
        self.vjp_strategy = vjp_strategy
        self.output_shape = self.shape if output_shape is None else tuple(int(n) for n in output_shape)
        if vjp_strategy == "symmetric" and not self.square:
            raise LocoError(
                f"vjp_strategy='symmetric' needs the output in the input's space, but the input has shape "
                f"{self.shape} and the output {self.output_shape}; use 'reverse' or 'auto'"
            )
        self.counter = ProductCounter()
        self._resolved_jvp: str | None = None if jvp_strategy == "auto" else jvp_strategy
        self._resolved_vjp: str | None = None if vjp_strategy == "auto" else vjp_strategy
        self._value: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def square(self) -> bool:
        """Whether the function maps into its own input space."""
        return self.output_shape == self.shape

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """D at a batch of points, counted as forward passes."""
        self.counter.forward += x.shape[0]
        with torch.no_grad():
            return self.denoiser(x, sigma_batch(self.sigma, x.shape[0], x))

    def value(self) -> torch.Tensor:
        """D(x), computed once."""
        if self._value is None:
            self._value = self.evaluate(self.x)
            check_finite("the denoiser output D(x)", self._value)
        return self._value

    def jvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """J v [k, *output_shape] for each of the k vectors in ``vectors`` [k, *shape]."""
        self._check_block("jvp", vectors, self.shape)

        if self._resolved_jvp is not None:
            try:
                result = self._run_jvp(self._resolved_jvp, vectors)
            except (RuntimeError, NotImplementedError) as error:
                if isinstance(error, JacobianError):
                    raise
                raise JacobianError(
                    f"JVP strategy {self._resolved_jvp} failed: {error}; "
                    "use jvp_strategy='auto' to fall back to another strategy"
                ) from error
            _check_product(f"JVP ({self._resolved_jvp})", result)
            return result

        failures = []
        for strategy in JVP_STRATEGIES[1:]:
            try:
                result = self._run_jvp(strategy, vectors)
                _check_product(f"JVP ({strategy})", result)
            except (RuntimeError, NotImplementedError) as error:
                failures.append(f"{strategy}: {error}")
                logger.info("JVP strategy %s failed, trying the next one: %s", strategy, error)
                continue
            if failures:
                logger.warning("JVP falls back to %s because %s", strategy, "; ".join(failures))
            self._resolved_jvp = strategy
            return result

        raise JacobianError("every JVP strategy failed: " + "; ".join(failures))

    def vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        """J^T u for each of the k cotangents in ``cotangents`` [k, ...].

        With vjp_strategy "symmetric" this returns J u instead, which is exact
        for the true posterior mean (its Jacobian is the posterior covariance
        over sigma^2) and an approximation for a trained network.
        """
        self._check_block("vjp", cotangents, self.output_shape)

        if self._resolved_vjp == "symmetric":
            return self.jvp(cotangents)

        try:
            result = self._vjp_reverse(cotangents)
        except RuntimeError as error:
            if self._resolved_vjp is None and self.square:
                logger.warning(
                    "reverse-mode VJP failed (%s); using the symmetric approximation J^T u = J u from now on", error
                )
                self._resolved_vjp = "symmetric"
                return self.jvp(cotangents)
            reason = str(error).strip().rstrip(".")
            remedy = (
                "Set vjp_strategy to 'auto' or 'symmetric' to avoid reverse mode"
                if self.square
                else "The symmetric approximation cannot replace it, because the output lies in another space "
                "than the input; take the Jacobian in the input's own space"
            )
            raise JacobianError(
                f"reverse-mode VJP failed: {reason}. {remedy}. Reverse mode needs weights that autograd can save "
                "(in Python, wrap the call in loco_core.jacobian.saveable_weights(module)) and no in-place edits "
                "of activations by patches"
            ) from error
        _check_product("VJP (reverse)", result)
        self._resolved_vjp = "reverse"
        return result

    @property
    def strategies(self) -> dict[str, str | None]:
        """The JVP and VJP strategies in use (None until the first product resolves "auto")."""
        return {"jvp": self._resolved_jvp, "vjp": self._resolved_vjp}

    def _check_block(self, name: str, block: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(block.shape[1:]) != expected:
            raise LocoError(f"{name} vectors have shape {tuple(block.shape[1:])}, expected {expected}")
        check_finite(f"{name} vectors", block)

    def _points(self, count: int) -> torch.Tensor:
        return self.x.expand(count, *self.shape)

    def _run_jvp(self, strategy: str, vectors: torch.Tensor) -> torch.Tensor:
        if strategy == "forward":
            return self._jvp_forward(vectors)
        if strategy == "double_vjp":
            return self._jvp_double_vjp(vectors)
        return self._jvp_finite_difference(vectors)

    def _jvp_forward(self, vectors: torch.Tensor) -> torch.Tensor:
        count = vectors.shape[0]
        self.counter.jvp += count

        # Tensors made inside inference mode cannot carry tangents; clones made
        # outside it can. no_grad keeps autograd from recording the weights.
        with torch.inference_mode(False), torch.no_grad():
            points = self._points(count).clone()
            tangents = vectors.to(points.dtype).clone()
            sigmas = sigma_batch(self.sigma, count, points)
            _, tangent_out = torch.func.jvp(lambda z: self.denoiser(z, sigmas), (points,), (tangents,))
        return tangent_out.detach()

    def _jvp_double_vjp(self, vectors: torch.Tensor) -> torch.Tensor:
        count = vectors.shape[0]
        self.counter.jvp += count

        with torch.inference_mode(False), torch.enable_grad():
            points = self._points(count).clone().requires_grad_(True)
            outputs = self.denoiser(points, sigma_batch(self.sigma, count, points))
            dummy = torch.zeros_like(outputs, requires_grad=True)
            (transposed,) = torch.autograd.grad(outputs, points, dummy, create_graph=True)
            (result,) = torch.autograd.grad(transposed, dummy, vectors.to(points.dtype).clone())
        return result.detach()

    def _jvp_finite_difference(self, vectors: torch.Tensor) -> torch.Tensor:
        count = vectors.shape[0]
        self.counter.forward += 2 * count

        dtype = torch.promote_types(self.x.dtype, torch.float32)
        points = self._points(count).to(dtype)
        tangents = vectors.to(dtype)
        flat_norms = tangents.flatten(1).norm(dim=1)
        if bool((flat_norms == 0).any()):
            raise JacobianError("finite differences got a zero vector")
        scale = max(float(self.x.to(dtype).norm()), 1.0)
        steps = (FINITE_DIFFERENCE_STEP * scale / flat_norms).view(count, *([1] * len(self.shape)))

        stacked = torch.cat([points + steps * tangents, points - steps * tangents])
        with torch.no_grad():
            outputs = self.denoiser(stacked, sigma_batch(self.sigma, 2 * count, stacked)).to(dtype)
        plus, minus = outputs[:count], outputs[count:]
        return (plus - minus) / (2 * steps)

    def _vjp_reverse(self, cotangents: torch.Tensor) -> torch.Tensor:
        count = cotangents.shape[0]
        self.counter.vjp += count

        with torch.inference_mode(False), torch.enable_grad():
            points = self._points(count).clone().requires_grad_(True)
            outputs = self.denoiser(points, sigma_batch(self.sigma, count, points))
            (result,) = torch.autograd.grad(outputs, points, cotangents.to(outputs.dtype).clone())
        return result.detach()


def _check_product(name: str, result: torch.Tensor) -> None:
    if not bool(torch.isfinite(result).all()):
        raise JacobianError(f"{name} returned NaN or infinite values")
    zero_rows = result.flatten(1).abs().amax(dim=1) == 0
    if bool(zero_rows.any()):
        raise JacobianError(
            f"{name} returned an exactly zero product for {int(zero_rows.sum())} of {result.shape[0]} vectors; "
            "autograd may be disabled (inference mode) or the model ignores its input"
        )


@contextlib.contextmanager
def saveable_weights(module: torch.nn.Module) -> Iterator[None]:
    """Let reverse mode run through a module whose weights are inference tensors.

    Each inference-tensor parameter or buffer is replaced by an ordinary copy
    without requires_grad for the duration of the block and restored after.
    The copies cost as much memory as those weights while the block runs.
    """
    swapped: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, tensor in list(owner._parameters.items()):
                if tensor is not None and tensor.is_inference():
                    swapped.append((owner, name, True, tensor))
                    owner._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
            for name, tensor in list(owner._buffers.items()):
                if tensor is not None and tensor.is_inference():
                    swapped.append((owner, name, False, tensor))
                    owner._buffers[name] = tensor.clone()
    try:
        yield
    finally:
        for owner, name, is_parameter, tensor in swapped:
            if is_parameter:
                owner._parameters[name] = tensor
            else:
                owner._buffers[name] = tensor
