"""Small convolutional classifier for the pack's colour digits.

``DigitCNN`` takes images ``[N, 3, 32, 32]`` in 0..1 and returns logits
``[N, 10]`` for the labels "0".."9". Normalisation lives inside the model,
so attacks and budgets work in pixel units. Batch normalisation follows
every convolution, so call ``.eval()`` before classifying or attacking: in
eval mode each image is classified on its own with the stored statistics.

The shipped weights (assets/models/digit_cnn.safetensors) come from
scripts/train_embedded.py; their metadata stores ``DigitCNNConfig`` as JSON
under the key ``"digit_cnn_config"``.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

LABELS: tuple[str, ...] = tuple(str(digit) for digit in range(10))


@dataclasses.dataclass(frozen=True)
class DigitCNNConfig:
    """Architecture of ``DigitCNN``.

    ``widths`` are the channel counts of the three convolution stages (two
    3x3 convolutions with batch normalisation each, then 2x2 max pooling:
    32 -> 16 -> 8 -> 4 pixels).
    ``mean`` and ``std`` normalise each input channel before the first layer.
    """

    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    num_classes: int = 10
    image_size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.3, 0.3, 0.3)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DigitCNNConfig":
        fields = json.loads(text)
        for key in ("widths", "mean", "std"):
            fields[key] = tuple(fields[key])
        return cls(**fields)


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class DigitCNN(nn.Module):
    """Classifier of three conv stages and a two-layer head, from 0..1 images to logits."""

    def __init__(self, config: DigitCNNConfig | None = None):
        super().__init__()
        self.config = config or DigitCNNConfig()
        widths = self.config.widths

        self.register_buffer("mean", torch.tensor(self.config.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.config.std).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            _conv_stage(3, widths[0]),
            _conv_stage(widths[0], widths[1]),
            _conv_stage(widths[1], widths[2]),
        )
        side = self.config.image_size // 8
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[2] * side * side, self.config.hidden),
            nn.ReLU(),
            nn.Linear(self.config.hidden, self.config.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"DigitCNN expects images of shape [N, 3, {size}, {size}] in 0..1, "
                f"got {tuple(images.shape)}; resize the images and drop any alpha channel"
            )
        normalised = (images - self.mean) / self.std
        return self.head(self.features(normalised))


def load_digit_cnn(path) -> DigitCNN:
    """Load DigitCNN weights and configuration from a safetensors file, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if "digit_cnn_config" not in metadata:
        raise ValueError(
            f"{path} has no 'digit_cnn_config' metadata; it was not written by scripts/train_embedded.py"
        )
    model = DigitCNN(DigitCNNConfig.from_json(metadata["digit_cnn_config"]))
    model.load_state_dict(state)
    return model.eval()
