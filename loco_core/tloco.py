"""T-LOCO: an edit direction supervised by an edit prompt.

With a source denoiser D_src and an edit denoiser D_edit (the same model with
the source and the edit conditioning) at the same point x and noise level:
    d = P (D_edit(x) - D_src(x))       the masked change the prompt requests
    v = J_edit^T d / |J_edit^T d|       the input direction that best produces it
then v is projected off the complement subspace as in plain LOCO. The edited
latent is decoded with the source conditioning.
"""

import torch

from .errors import LocoError
from .jacobian import JacobianProducts
from .locality import leakage, project_out
from .subspace import broadcast_mask


def text_change(source_value: torch.Tensor, edit_value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d = P (D_edit(x) - D_src(x)) for one image [1, *shape]; raises when the prompts agree inside the mask."""
    weights = broadcast_mask(mask, tuple(source_value.shape[1:])).to(source_value.device)
    change = weights * (edit_value - source_value)
    if float(change.abs().max()) == 0:
        raise LocoError(
            "the edit conditioning predicts the same image as the source inside the mask; "
            "use a different edit prompt or a higher noise level"
        )
    return change


def pull_back(edit: JacobianProducts, change: torch.Tensor, null_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """Unit direction [1, *shape] along J_edit^T d, with span(null_vectors) removed."""
    vector = edit.vjp(change)
    vector = vector / vector.norm()
    if null_vectors is not None and null_vectors.shape[0] > 0:
        vector = project_out(vector, null_vectors)
    return vector


def text_direction(
    source: JacobianProducts,
    edit: JacobianProducts,
    mask: torch.Tensor,
    null_vectors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit T-LOCO direction [*shape] and its leakage under the source model."""
    same_point = source.sigma == edit.sigma and torch.equal(source.x, edit.x)
    same_shapes = source.shape == edit.shape and source.output_shape == edit.output_shape
    if not (same_point and same_shapes):
        raise LocoError("source and edit products must be taken at the same latent and noise level")

    change = text_change(source.value(), edit.value(), mask)
    vector = pull_back(edit, change, null_vectors)
    return vector[0], leakage(source, vector, mask)[0]
