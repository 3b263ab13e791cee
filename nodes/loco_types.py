"""Values that LOCO nodes pass between each other."""

from dataclasses import dataclass

import torch

from comfy_api.latest import io

Inversion = io.Custom("LOCO_INVERSION")
Directions = io.Custom("LOCO_DIRECTIONS")


@dataclass(frozen=True)
class InvertedLatent:
    """Latents carried up to the edit level by the deterministic ODE.

    samples: [B, C, h, w] in model space at sigma = grid[-1].
    grid: ascending sigmas from the floor to the edit level (float64); decoding
    walks it reversed, so an unedited decode reproduces the plain one.
    """

    samples: torch.Tensor
    grid: torch.Tensor
    edit_level: float
    model_fingerprint: str

    @property
    def sigma(self) -> float:
        return float(self.grid[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape)

    def image(self, batch_index: int) -> torch.Tensor:
        """Return one inverted latent [1, C, h, w]."""
        batch = self.samples.shape[0]
        if not 0 <= batch_index < batch:
            raise ValueError(f"batch_index {batch_index} is out of range; the inverted batch contains images 0..{batch - 1}")
        return self.samples[batch_index : batch_index + 1]
