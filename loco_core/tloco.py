"""T-LOCO: an edit direction supervised by an edit prompt.

With a source denoiser D_src and an edit denoiser D_edit (the same model with
the source and the edit conditioning) at the same point x and noise level:
    d = P (D_edit(x) - D_src(x))       the masked change the prompt asks for
    v = J_edit^T d / |J_edit^T d|       the input direction that best produces it
then v is projected off the complement subspace as in plain LOCO. The edited
latent is decoded with the source conditioning.
"""

import torch

from .errors import LocoError
from .jacobian import JacobianProducts
from .locality import leakage, project_out
from .subspace import broadcast_mask


def text_direction(
    source: JacobianProducts,
    edit: JacobianProducts,
    mask: torch.Tensor,
    null_vectors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit T-LOCO direction [*shape] and its leakage under the source model."""
    if source.shape != edit.shape or source.sigma != edit.sigma or not torch.equal(source.x, edit.x):
        raise LocoError("source and edit products must be taken at the same latent and noise level")
    weights = broadcast_mask(mask, source.shape).to(source.x.device)

    change = weights * (edit.value() - source.value())
    if float(change.abs().max()) == 0:
        raise LocoError(
            "the edit conditioning predicts the same image as the source inside the mask; "
            "use a different edit prompt or a higher noise level"
        )

    vector = edit.vjp(change)
    vector = vector / vector.norm()
    if null_vectors is not None and null_vectors.shape[0] > 0:
        vector = project_out(vector, null_vectors)

    return vector[0], leakage(source, vector, weights)[0]
