"""Top right singular vectors of the masked Jacobian P J by block subspace iteration.

P is a diagonal mask on D's output (the rows of J), with weights in [0, 1]. The
right singular vectors of A = P J span the input directions that move the
masked region the most: LOCO's edit directions.

Each round pushes the whole block of k = rank + oversample vectors through
the denoiser at once:
  Y = A Q          one batched JVP (masked)
  Rayleigh-Ritz:   the SVD of Y gives the best rank-r approximation inside
                   span(Q): Ritz vectors Q W[:, :r] and values S[:r]
  Z = A^T A Q      one batched VJP of P Y
  Q <- qr(Z)       orthonormal basis for the next round
Iteration stops when the sine of the largest principal angle between the
Ritz subspaces of two successive rounds falls below the tolerance. Principal
angles do not depend on the signs or order of the vectors, unlike an
element-wise comparison. The extra oversample vectors speed convergence from
the ratio (s_{r+1} / s_r)^2 per round to (s_{k+1} / s_r)^2.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import LocoError
from .jacobian import JacobianProducts

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, int, float], None]


@dataclass
class ConvergenceRecord:
    """How a subspace iteration ended.

    angle_changes[i] is the sine of the largest principal angle between the
    Ritz subspaces of rounds i + 1 and i + 2. ``converged`` means the last
    change fell below the tolerance. When the singular values around the
    rank are nearly equal, the error to the true subspace can be larger.
    """

    rounds: int = 0
    forward_equivalents: int = 0
    jvp_vectors: int = 0
    vjp_vectors: int = 0
    angle_changes: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def last_angle_change(self) -> float:
        return self.angle_changes[-1] if self.angle_changes else float("nan")

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "forward_equivalents": self.forward_equivalents,
            "jvp_vectors": self.jvp_vectors,
            "vjp_vectors": self.vjp_vectors,
            "angle_changes": list(self.angle_changes),
            "last_angle_change": self.last_angle_change,
            "converged": self.converged,
        }


@dataclass
class MaskedSubspace:
    """Orthonormal vectors [r, *shape], singular values [r] of P J, and the convergence record."""

    vectors: torch.Tensor
    singular_values: torch.Tensor
    record: ConvergenceRecord


def broadcast_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Validate the mask and expand it to the image shape [*shape] as float."""
    mask = torch.as_tensor(mask)
    if not mask.is_floating_point():
        mask = mask.float()
    while mask.ndim > len(shape) and mask.shape[0] == 1:
        mask = mask[0]
    try:
        expanded = mask.expand(shape)
    except RuntimeError:
        raise LocoError(
            f"mask of shape {tuple(mask.shape)} does not match the image shape {shape}; "
            "resize the mask to the image's height and width"
        ) from None
    if not bool(torch.isfinite(expanded).all()):
        raise LocoError("mask contains NaN or infinite values")
    if bool((expanded < 0).any()) or bool((expanded > 1).any()):
        raise LocoError("mask values must lie in [0, 1]; rescale the mask")
    return expanded.clone()


def masked_subspace(
    products: JacobianProducts,
    mask: torch.Tensor,
    rank: int,
    oversample: int = 4,
    max_rounds: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
    warm_start: torch.Tensor | None = None,
    on_round: RoundCallback | None = None,
) -> MaskedSubspace:
    """Top ``rank`` right singular vectors of P J at the point of ``products``.

    ``on_round(round, max_rounds, angle_change)`` runs after every round; it
    may raise to stop the iteration (for example on a user interrupt).
    """
    shape = products.shape
    weights = broadcast_mask(mask, products.output_shape).to(products.x.device)
    _check_rank(rank, weights, products)
    if max_rounds < 2:
        raise LocoError(f"max_rounds={max_rounds}; the stopping rule compares two rounds, so use at least 2")
    if oversample < 0:
        raise LocoError(f"oversample={oversample} must be 0 or more")

    dimension = math.prod(shape)
    masked_dimension = int((weights > 0).sum())
    block = min(rank + oversample, dimension, masked_dimension)
    work_dtype = torch.promote_types(products.x.dtype, torch.float32)
    start_counts = (products.counter.jvp, products.counter.vjp, products.counter.forward_equivalents())

    basis = _initial_basis(dimension, block, seed, warm_start, work_dtype, products.x.device)
    record = ConvergenceRecord()
    previous: torch.Tensor | None = None
    ritz_vectors = ritz_values = None

    for round_index in range(1, max_rounds + 1):
        masked_image = weights * products.jvp(_as_images(basis, shape)).to(work_dtype)
        ritz_vectors, ritz_values = _rayleigh_ritz(basis, masked_image, rank)
        record.rounds = round_index

        change = float("nan")
        if previous is not None:
            change = principal_angle_sine(previous, ritz_vectors)
            record.angle_changes.append(change)
        if on_round is not None:
            on_round(round_index, max_rounds, change)
        if previous is not None and change <= tolerance:
            record.converged = True
            break
        if round_index == max_rounds:
            break

        previous = ritz_vectors
        normal_image = products.vjp(weights * masked_image).to(work_dtype)
        basis, _ = torch.linalg.qr(normal_image.reshape(block, -1).T)

    if not record.converged:
        logger.warning(
            "subspace iteration stopped after %d rounds without converging: last angle change %.3g > %.3g",
            record.rounds, record.last_angle_change, tolerance,
        )

    record.jvp_vectors = products.counter.jvp - start_counts[0]
    record.vjp_vectors = products.counter.vjp - start_counts[1]
    record.forward_equivalents = products.counter.forward_equivalents() - start_counts[2]
    vectors = canonical_signs(_as_images(ritz_vectors, shape))
    return MaskedSubspace(vectors, ritz_values, record)


def principal_angle_sine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Sine of the largest principal angle between two orthonormal sets.

    Each set is an [n, r] matrix with the vectors as columns, or a block of
    r image-shaped vectors [r, *shape].
    """
    first = first.reshape(first.shape[0], -1).T if first.ndim > 2 else first
    second = second.reshape(second.shape[0], -1).T if second.ndim > 2 else second
    residual = second - first @ (first.T @ second)
    return float(torch.linalg.matrix_norm(residual, ord=2).clamp(max=1.0))


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each vector [k, *shape] so that its entry of largest magnitude is positive.

    Singular vectors are defined up to sign; a fixed rule makes results
    repeatable and comparable across runs.
    """
    flat = vectors.reshape(vectors.shape[0], -1)
    largest = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))
    signs = torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors * signs.view(-1, *([1] * (vectors.ndim - 1)))


def _check_rank(rank: int, weights: torch.Tensor, products: JacobianProducts) -> None:
    masked_dimension = int((weights > 0).sum())
    if masked_dimension == 0:
        raise LocoError("the mask is empty (all zero); paint the region to edit")
    if rank < 1:
        raise LocoError(f"rank={rank}; ask for at least one direction")
    if rank > masked_dimension:
        raise LocoError(
            f"rank={rank} exceeds the masked dimension {masked_dimension} (mask entries times channels "
            f"of an output of shape {products.output_shape}); lower the rank or enlarge the mask"
        )
    if rank > math.prod(products.shape):
        raise LocoError(
            f"rank={rank} exceeds the dimension {math.prod(products.shape)} of the input of shape "
            f"{products.shape}; lower the rank"
        )


def _initial_basis(dimension, block, seed, warm_start, dtype, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    columns = torch.randn(dimension, block, generator=generator, dtype=torch.float64)
    if warm_start is not None:
        warm = warm_start.reshape(warm_start.shape[0], -1).to(torch.float64).cpu()
        if warm.shape[1] != dimension:
            raise LocoError(f"warm_start vectors have {warm.shape[1]} entries, expected {dimension}")
        used = min(warm.shape[0], block)
        columns[:, :used] = warm[:used].T
    basis, _ = torch.linalg.qr(columns)
    return basis.to(dtype=dtype, device=device)


def _as_images(columns: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return columns.T.reshape(columns.shape[1], *shape).contiguous()


def _rayleigh_ritz(basis: torch.Tensor, masked_image: torch.Tensor, rank: int):
    # masked_image rows are (A q_i)^T, so the matrix is (A Q)^T = W S U^T and the
    # left factor of its SVD rotates the basis onto the Ritz vectors.
    rotation, values, _ = torch.linalg.svd(masked_image.reshape(masked_image.shape[0], -1), full_matrices=False)
    return basis @ rotation[:, :rank], values[:rank]
