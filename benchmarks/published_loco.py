"""The subspace procedure of the published LOCO Edit code, rewritten from a description of it as a baseline.

Each round takes the r current vectors one at a time: one JVP per vector
(J v, one vector per call), then one VJP per masked output (J^T P J v, one
call each). The r results, stacked as rows, go through an SVD and its right
singular vectors become the next vectors. The loop stops when the new vectors
equal the previous ones element-wise (torch.allclose, atol 1e-3) once the
round index exceeds min_iter (10 in the published code, so at least 12
rounds run), or after 50 rounds. The element-wise test compares signs too,
and singular vectors have arbitrary signs, so a sign flip between rounds
keeps the loop running. The benchmark keeps that behaviour on purpose.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from loco_core import JacobianProducts

PUBLISHED_MIN_ITER = 10
PUBLISHED_MAX_ROUNDS = 50
PUBLISHED_ATOL = 1e-3

RoundObserver = Callable[[int, torch.Tensor], None]


@dataclass
class PublishedRun:
    """Final vectors [r, *shape], the rounds run and whether the element-wise test stopped the loop."""

    vectors: torch.Tensor
    rounds: int
    converged: bool


def published_subspace(
    products: JacobianProducts,
    weights: torch.Tensor,
    rank: int,
    seed: int,
    min_iter: int = PUBLISHED_MIN_ITER,
    max_rounds: int = PUBLISHED_MAX_ROUNDS,
    atol: float = PUBLISHED_ATOL,
    on_round: RoundObserver | None = None,
) -> PublishedRun:
    """Find the top ``rank`` right singular vectors of P J by the published one-vector-per-call power iteration.

    ``weights`` is the mask P expanded to the image shape. ``on_round(round,
    vectors)`` receives the vectors [r, n] after each round. The benchmark
    passes it only in untimed runs.
    """
    shape = products.shape
    dimension = weights.numel()
    dtype = torch.promote_types(products.x.dtype, torch.float32)
    weights = weights.to(dtype)

    generator = torch.Generator().manual_seed(int(seed))
    start = torch.randn(dimension, rank, generator=generator, dtype=torch.float64)
    vectors = torch.linalg.qr(start)[0].T.to(dtype)

    for round_index in range(max_rounds):
        masked_outputs = [weights * products.jvp(vector.reshape(1, *shape)).to(dtype) for vector in vectors]
        normal_products = [products.vjp(weights * output).to(dtype) for output in masked_outputs]

        stacked = torch.cat(normal_products).reshape(rank, dimension)
        new_vectors = torch.linalg.svd(stacked, full_matrices=False).Vh[:rank]
        if on_round is not None:
            on_round(round_index + 1, new_vectors)

        if torch.allclose(new_vectors, vectors, atol=atol) and round_index > min_iter:
            return PublishedRun(new_vectors.reshape(rank, *shape), round_index + 1, True)
        vectors = new_vectors

    return PublishedRun(vectors.reshape(rank, *shape), max_rounds, False)
