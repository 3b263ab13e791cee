"""Keep edits local: remove the directions that move the rest of the image.

With P the mask and P' = I - P its complement, the top right singular vectors
V' of P' J are the input directions that change the unmasked region most.
Each edit direction v becomes v - V' V'^T v, and the set is orthonormalised
again. Leakage |P' J v| / |P J v| measures how much an edit moves the
unmasked region relative to the masked one.
"""

import torch

from .jacobian import JacobianProducts
from .subspace import broadcast_mask


def project_out(vectors: torch.Tensor, null_vectors: torch.Tensor) -> torch.Tensor:
    """Remove span(null_vectors) from each of ``vectors`` [k, *shape] and orthonormalise the result.

    Gram-Schmidt order is kept, so the first result stays closest to the first
    input, and each result keeps a positive inner product with its projected input.
    """
    flat = vectors.reshape(vectors.shape[0], -1).to(torch.float64)
    null = null_vectors.reshape(null_vectors.shape[0], -1).to(torch.float64)
    projected = flat - (flat @ null.T) @ null

    basis, triangular = torch.linalg.qr(projected.T)
    signs = torch.where(torch.diagonal(triangular) < 0, -1.0, 1.0).to(torch.float64)
    orthonormal = (basis * signs).T
    return orthonormal.reshape(vectors.shape).to(vectors.dtype)


def leakage(products: JacobianProducts, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|P' J v| / |P J v| for each of ``vectors`` [k, *shape], from one batched JVP."""
    weights = broadcast_mask(mask, products.output_shape).to(products.x.device)
    response = products.jvp(vectors)
    inside = (weights * response).flatten(1).norm(dim=1)
    outside = ((1 - weights) * response).flatten(1).norm(dim=1)
    return outside / inside.clamp_min(torch.finfo(inside.dtype).tiny)
