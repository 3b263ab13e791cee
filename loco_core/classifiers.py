"""Image classifiers for the attacks: safetensors loading, normalisation and noise smoothing.

A classifier takes ``[B, 3, H, W]`` images in 0..1 and returns logits. The
wrapper ``ImageClassifier`` applies the architecture's input normalisation
(and an optional resize to the size the network was trained on), so attack
budgets stay in pixel units. ``SmoothedClassifier`` adds Gaussian noise to
the input (randomised smoothing) and decides by a seeded majority vote.

Weights are read from safetensors files only: ``.pt``, ``.pth``, ``.ckpt``
and ``.bin`` files are pickles that can run code when loaded, so they are
rejected.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Draws per forward pass when voting, to bound memory on large images.
VOTE_CHUNK = 64


@dataclass(frozen=True)
class Architecture:
    """How to build one classifier architecture and what its inputs look like."""

    name: str
    build: Callable[[int, dict[str, str]], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None
    num_classes_key: str | None


def _build_digit_cnn(num_classes: int, metadata: dict[str, str]) -> nn.Module:
    from .digit_cnn import DigitCNN, DigitCNNConfig

    # The shipped weights store their configuration in the safetensors
    # metadata; files without it use the default configuration.
    config_json = metadata.get("digit_cnn_config")
    config = DigitCNNConfig.from_json(config_json) if config_json else DigitCNNConfig()
    if config.num_classes != num_classes:
        raise ValueError(f"digit_cnn configuration has {config.num_classes} classes, but {num_classes} were expected")
    return DigitCNN(config)


def _torchvision_builder(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int, metadata: dict[str, str]) -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


def _torchvision_available() -> bool:
    try:
        import torchvision.models  # noqa: F401
    except ImportError:
        return False
    return True


def architectures() -> dict[str, Architecture]:
    """Return the architectures that can be built here, by name.

    ``digit_cnn`` is the pack's embedded digit classifier (inputs 32x32 in
    0..1; it normalises inside, so the wrapper adds none). The ResNet family comes from torchvision when it
    is importable (every ComfyUI install has it) and uses ImageNet
    normalisation at any input size.
    """
    available = {
        "digit_cnn": Architecture("digit_cnn", _build_digit_cnn, (0.0,), (1.0,), (32, 32), None),
    }
    if _torchvision_available():
        for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"):
            available[name] = Architecture(
                name, _torchvision_builder(name), IMAGENET_MEAN, IMAGENET_STD, None, "fc.weight"
            )
    return available


class ImageClassifier(nn.Module):
    """Wrap a network so it takes ``[B, 3, H, W]`` images in 0..1 and returns logits.

    Normalisation ``(x - mean) / std`` happens inside. When ``input_size`` is
    set, images of another size are first resized bilinearly inside the
    differentiable model, so attacks still work in the image's own pixels.
    """

    def __init__(
        self,
        network: nn.Module,
        labels: list[str],
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
        input_size: tuple[int, int] | None = None,
        name: str = "",
    ):
        super().__init__()
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive, got {std}")
        self.network = network
        self.labels = list(labels)
        self.input_size = input_size
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"classifier input must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if self.input_size is not None and tuple(images.shape[-2:]) != tuple(self.input_size):
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.network((images - self.mean) / self.std)


class SmoothedClassifier(nn.Module):
    """Gaussian-noise smoothing of a classifier (randomised smoothing).

    ``forward`` classifies one noisy copy, x + N(0, sigma^2) in pixel units,
    drawing the noise from ``generator`` when given. ``class_scores`` is the
    smoothed decision: the share of ``vote_draws`` noisy draws that vote for
    each class, with the noise seeded by ``vote_seed`` so repeated calls
    agree. The majority class wins; ties go to the lower class index.
    """

    def __init__(self, base: nn.Module, noise_sigma: float, vote_draws: int = 100, vote_seed: int = 0):
        super().__init__()
        if noise_sigma <= 0:
            raise ValueError(f"noise_sigma must be > 0 for smoothing, got {noise_sigma}; use the base classifier")
        if vote_draws < 1:
            raise ValueError(f"vote_draws must be >= 1, got {vote_draws}")
        self.base = base
        self.noise_sigma = float(noise_sigma)
        self.vote_draws = int(vote_draws)
        self.vote_seed = int(vote_seed)

    @property
    def labels(self) -> list[str]:
        return self.base.labels

    @property
    def num_classes(self) -> int:
        return len(self.base.labels)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return self.base(images + self.noise_sigma * noise)

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``[B, K]`` vote shares over ``vote_draws`` seeded noise draws."""
        generator = torch.Generator(device=images.device).manual_seed(self.vote_seed)
        counts = torch.zeros(images.shape[0], self.num_classes, device=images.device)
        remaining = self.vote_draws
        with torch.no_grad():
            while remaining > 0:
                draws = min(remaining, VOTE_CHUNK)
                logits = self(images.repeat(draws, 1, 1, 1), generator=generator)
                votes = logits.argmax(dim=1).view(draws, images.shape[0])
                counts += F.one_hot(votes, self.num_classes).sum(dim=0).float()
                remaining -= draws
        return counts / self.vote_draws


def read_labels(path: str | Path) -> list[str]:
    """Read class labels, one per class, from a text file (one per line) or JSON.

    JSON may be a list of strings or an object mapping class indices
    ("0", "1", ...) to names. Blank lines in text files are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]

    data = json.loads(text)
    if isinstance(data, list):
        return [str(label) for label in data]
    if isinstance(data, dict):
        try:
            indices = sorted(int(key) for key in data)
        except ValueError as error:
            raise ValueError(f"{path}: JSON object keys must be class indices, got {list(data)[:5]}") from error
        if indices != list(range(len(indices))):
            raise ValueError(f"{path}: JSON class indices must be 0..{len(indices) - 1} without gaps")
        return [str(data[str(index)]) for index in indices]
    raise ValueError(f"{path}: JSON labels must be a list of names or an object of index -> name")


def _check_weights_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle file ({path.suffix}); it is not loaded because unpickling can run code. "
            "Convert it to .safetensors (safetensors.torch.save_file(model.state_dict(), ...)) and load that"
        )
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: classifier weights must be a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")


def _read_header(path: Path, spec: Architecture) -> tuple[int, dict[str, str]]:
    """Return the class count and the metadata of a safetensors file without loading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if spec.num_classes_key is None:
            config = json.loads(metadata.get("digit_cnn_config", "{}"))
            return int(config.get("num_classes", 10)), metadata
        if spec.num_classes_key not in handle.keys():
            raise ValueError(f"{path.name} has no tensor {spec.num_classes_key!r}; is it a {spec.name} state dict?")
        return handle.get_slice(spec.num_classes_key).get_shape()[0], metadata


def _metadata_labels(metadata: dict[str, str], num_classes: int) -> list[str]:
    """Return the labels stored in the file's metadata (key "labels", a JSON list), else the class indices."""
    try:
        labels = json.loads(metadata.get("labels", "null"))
    except json.JSONDecodeError:
        labels = None
    if isinstance(labels, list) and len(labels) == num_classes:
        return [str(label) for label in labels]
    return [str(index) for index in range(num_classes)]


def load_classifier(
    weights_path: str | Path,
    architecture: str,
    labels_path: str | Path | None = None,
    noise_sigma: float = 0.0,
    vote_draws: int = 100,
    vote_seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build ``architecture``, load safetensors weights and wrap it for attacks.

    Returns an ``ImageClassifier`` in eval mode, or a ``SmoothedClassifier``
    around it when ``noise_sigma`` > 0 (pixel units of 0..1 images). Without
    a labels file, labels come from the file's metadata (key "labels", a JSON
    list) or default to the class indices as strings. The model is built outside
    inference mode so autograd can run through it later, even when the
    caller is inside ``torch.inference_mode()``.
    """
    path = Path(weights_path)
    _check_weights_path(path)
    specs = architectures()
    if architecture not in specs:
        raise ValueError(f"unknown architecture {architecture!r}; available: {sorted(specs)}")
    spec = specs[architecture]
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")

    num_classes, metadata = _read_header(path, spec)
    labels = read_labels(labels_path) if labels_path else _metadata_labels(metadata, num_classes)
    if len(labels) != num_classes:
        raise ValueError(f"labels file has {len(labels)} labels but the classifier has {num_classes} classes")

    with torch.inference_mode(False):
        network = spec.build(num_classes, metadata)
        state = load_file(str(path), device="cpu")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path.name} does not match architecture {architecture!r}: {error}") from error
        classifier: nn.Module = ImageClassifier(network, labels, spec.mean, spec.std, spec.input_size, architecture)
        if noise_sigma > 0:
            classifier = SmoothedClassifier(classifier, noise_sigma, vote_draws, vote_seed)
        classifier = classifier.to(device).eval()
        classifier.requires_grad_(False)

    logger.info("loaded classifier %s (%s, %d classes) from %s", architecture, type(classifier).__name__, num_classes, path)
    return classifier
