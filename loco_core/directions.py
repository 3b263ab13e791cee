"""LOCO edit directions: finding them, storing them, combining and transferring them.

``find_directions`` runs the method's steps 2 and 3 at one noise level:
the top singular vectors of the masked Jacobian P J, then the projection that
removes the top singular vectors of the complement (I - P) J.
A DirectionSet is plain data: it saves to safetensors with JSON metadata
and never goes through pickle.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LocoError
from .jacobian import JacobianProducts
from .locality import leakage, project_out
from .subspace import RoundCallback, broadcast_mask, masked_subspace

logger = logging.getLogger(__name__)

FORMAT_NAME = "loco-directions"
FORMAT_VERSION = "1"


@dataclass
class DirectionSet:
    """Unit edit directions found at one image and noise level.

    vectors: [r, *shape], orthonormal after the null-space projection.
    singular_values: [r] singular values of P J before the projection.
    leakage_before, leakage_after: [r] |(I-P) J v| / |P J v| before and after it.
    mask: the output mask, broadcastable to the output shape of the products
          (``shape`` itself unless the Jacobian was taken through a decoder).
    parameters: the settings that made the set (rank, seed, rounds, ...).
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    sigma: float
    mask: torch.Tensor
    model_fingerprint: str = ""
    parameters: dict = field(default_factory=dict)
    leakage_before: torch.Tensor | None = None
    leakage_after: torch.Tensor | None = None
    null_vectors: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[1:])

    @property
    def rank(self) -> int:
        return self.vectors.shape[0]

    def direction(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.rank:
            raise LocoError(f"direction index {index} is out of range; this set has directions 0..{self.rank - 1}")
        return self.vectors[index]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as safetensors; an existing file is never overwritten."""
        path = Path(path)
        if path.exists():
            raise LocoError(f"{path} already exists; choose another file name")
        path.parent.mkdir(parents=True, exist_ok=True)

        # Write beside the target and link it into place, so a file created
        # meanwhile by someone else is not replaced.
        temporary = path.with_name(path.name + ".partial")
        save_file(self._tensors(), str(temporary), metadata=self._metadata())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise LocoError(f"{path} already exists; choose another file name") from None
        finally:
            temporary.unlink(missing_ok=True)
        return path

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in ("vectors", "singular_values", "mask", "leakage_before", "leakage_after", "null_vectors"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().float().cpu().contiguous()
        return tensors

    def _metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sigma": repr(float(self.sigma)),
            "shape": json.dumps(list(self.shape)),
            "model_fingerprint": self.model_fingerprint,
            "parameters": json.dumps(self.parameters, sort_keys=True),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DirectionSet":
        path = Path(path)
        if path.suffix != ".safetensors":
            raise LocoError(f"{path.name} is not a .safetensors file; direction sets are stored as safetensors")
        if not path.is_file():
            raise LocoError(f"direction file {path} not found")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise LocoError(f"{path.name} is not a LOCO direction file (metadata format={metadata.get('format')!r})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return cls(
            vectors=tensors["vectors"],
            singular_values=tensors["singular_values"],
            sigma=float(metadata["sigma"]),
            mask=tensors["mask"],
            model_fingerprint=metadata.get("model_fingerprint", ""),
            parameters=json.loads(metadata.get("parameters", "{}")),
            leakage_before=tensors.get("leakage_before"),
            leakage_after=tensors.get("leakage_after"),
            null_vectors=tensors.get("null_vectors"),
        )


def find_directions(
    products: JacobianProducts,
    mask: torch.Tensor,
    rank: int = 5,
    null_rank: int = 5,
    oversample: int = 4,
    max_rounds: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
    model_fingerprint: str = "",
    on_round: RoundCallback | None = None,
) -> DirectionSet:
    """Edit directions inside ``mask`` at the point and noise level of ``products``."""
    weights = broadcast_mask(mask, products.output_shape)
    check_null_rank(null_rank, weights)

    edit = masked_subspace(products, weights, rank, oversample, max_rounds, tolerance, seed, on_round=on_round)
    parameters = {
        "rank": rank,
        "null_rank": null_rank,
        "oversample": oversample,
        "max_rounds": max_rounds,
        "tolerance": tolerance,
        "seed": seed,
        "edit_subspace": edit.record.as_dict(),
    }

    if null_rank == 0:
        parameters["strategies"] = products.strategies
        return DirectionSet(
            vectors=edit.vectors,
            singular_values=edit.singular_values,
            sigma=products.sigma,
            mask=weights,
            model_fingerprint=model_fingerprint,
            parameters=parameters,
        )

    null = masked_subspace(products, 1 - weights, null_rank, oversample, max_rounds, tolerance, seed + 1, on_round=on_round)
    parameters["null_subspace"] = null.record.as_dict()
    local = project_out(edit.vectors, null.vectors)

    both = leakage(products, torch.cat([edit.vectors, local]), weights)
    parameters["strategies"] = products.strategies
    return DirectionSet(
        vectors=local,
        singular_values=edit.singular_values,
        sigma=products.sigma,
        mask=weights,
        model_fingerprint=model_fingerprint,
        parameters=parameters,
        leakage_before=both[:rank],
        leakage_after=both[rank:],
        null_vectors=null.vectors,
    )


def check_null_rank(null_rank: int, weights: torch.Tensor) -> None:
    """Check null_rank against the region outside the mask before any product runs."""
    if null_rank < 0:
        raise LocoError(f"null_rank={null_rank} must be 0 or more")
    if null_rank == 0:
        return
    outside = int((weights < 1).sum())
    if outside == 0:
        raise LocoError(
            "the mask covers the whole image, so there is no region outside it to protect; "
            "set null_rank to 0 for global directions or paint a smaller mask"
        )
    if null_rank > outside:
        raise LocoError(
            f"null_rank={null_rank} exceeds the dimension {outside} of the region outside the mask "
            "(entries times channels); lower null_rank or paint a smaller mask"
        )


def compose(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted sum of directions of one shape; the result is not normalised, so weights act as strengths."""
    if len(vectors) == 0:
        raise LocoError("compose needs at least one direction")
    if len(vectors) != len(weights):
        raise LocoError(f"compose got {len(vectors)} directions but {len(weights)} weights; give one weight each")
    shape = vectors[0].shape
    for index, vector in enumerate(vectors):
        if vector.shape != shape:
            raise LocoError(
                f"direction {index} has shape {tuple(vector.shape)}, expected {tuple(shape)}; "
                "compose directions found on latents of the same size"
            )
    return sum(float(w) * v for w, v in zip(weights, vectors))


def transfer(
    direction: torch.Tensor,
    target: JacobianProducts,
    mask: torch.Tensor,
    null_rank: int = 5,
    oversample: int = 4,
    max_rounds: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
    on_round: RoundCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt directions to another image: project out the target's complement subspace.

    ``direction`` is one direction [*shape] or a block [k, *shape]. Returns
    unit directions of the same shape and their leakage on the target. With
    null_rank 0 the directions are only normalised.
    """
    single = tuple(direction.shape) == target.shape
    block = direction[None] if single else direction
    if tuple(block.shape[1:]) != target.shape:
        raise LocoError(
            f"direction shape {tuple(direction.shape)} differs from the target latent shape {target.shape}; "
            "transfer between latents of the same size"
        )
    weights = broadcast_mask(mask, target.output_shape)
    check_null_rank(null_rank, weights)
    block = block.to(device=target.x.device, dtype=torch.promote_types(target.x.dtype, torch.float32))
    norms = block.flatten(1).norm(dim=1)
    if bool((norms == 0).any()):
        raise LocoError("a direction to transfer is zero")
    block = block / norms.view(-1, *([1] * len(target.shape)))

    if null_rank > 0:
        null = masked_subspace(target, 1 - weights, null_rank, oversample, max_rounds, tolerance, seed, on_round=on_round)
        block = project_out(block, null.vectors)

    block_leakage = leakage(target, block, weights)
    if single:
        return block[0], block_leakage[0]
    return block, block_leakage
