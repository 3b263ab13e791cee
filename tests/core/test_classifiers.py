"""Classifier loading from safetensors, normalisation, labels and noise smoothing."""

import json

import pytest
import torch
from safetensors.torch import save_file

from loco_core.classifiers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    SmoothedClassifier,
    architectures,
    load_classifier,
    read_labels,
)
from loco_core.digit_cnn import DigitCNN, DigitCNNConfig

SMALL_CONFIG = DigitCNNConfig(widths=(4, 8, 8), hidden=16)


@pytest.fixture
def digit_weights(tmp_path):
    torch.manual_seed(0)
    network = DigitCNN(SMALL_CONFIG).eval()
    path = tmp_path / "digits.safetensors"
    save_file(network.state_dict(), str(path), metadata={"digit_cnn_config": SMALL_CONFIG.to_json()})
    return path, network


def test_digit_cnn_loads_with_config_from_metadata(digit_weights):
    path, network = digit_weights
    classifier = load_classifier(path, "digit_cnn")
    images = torch.rand(2, 3, 32, 32)

    assert isinstance(classifier, ImageClassifier)
    assert not classifier.training
    assert classifier.labels == [str(digit) for digit in range(10)]
    assert torch.allclose(classifier(images), network(images), atol=1e-6)


def test_digit_classifier_resizes_other_image_sizes(digit_weights):
    path, _ = digit_weights
    classifier = load_classifier(path, "digit_cnn")

    assert classifier(torch.rand(1, 3, 64, 48)).shape == (1, 10)


def test_classifier_loaded_in_inference_mode_supports_autograd(digit_weights):
    path, _ = digit_weights
    with torch.inference_mode():
        classifier = load_classifier(path, "digit_cnn")
    with torch.enable_grad():
        images = torch.rand(1, 3, 32, 32, requires_grad=True)
        classifier(images).sum().backward()

    assert torch.isfinite(images.grad).all()
    assert all(not parameter.requires_grad for parameter in classifier.parameters())


@pytest.mark.skipif("resnet18" not in architectures(), reason="torchvision is not installed")
def test_resnet_normalises_inside_wrapper(tmp_path):
    import torchvision

    torch.manual_seed(1)
    network = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    path = tmp_path / "resnet.safetensors"
    save_file(network.state_dict(), str(path))
    classifier = load_classifier(path, "resnet18")
    images = torch.rand(1, 3, 64, 64)

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network((images - mean) / std)
        assert classifier.num_classes == 5
        assert torch.allclose(classifier(images), expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickle_files_are_rejected_before_reading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")

    with pytest.raises(ValueError, match="unpickling can run code"):
        load_classifier(path, "digit_cnn")


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(tmp_path / "absent.safetensors", "digit_cnn")


def test_unknown_architecture_raises(digit_weights):
    with pytest.raises(ValueError, match="unknown architecture"):
        load_classifier(digit_weights[0], "vgg_unknown")


def test_mismatched_weights_raise_with_architecture_name(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"unrelated.weight": torch.zeros(3)}, str(path))

    with pytest.raises(ValueError, match="does not match architecture 'digit_cnn'"):
        load_classifier(path, "digit_cnn")


def test_labels_from_text_and_json(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("cat\ndog\n\nbird\n", encoding="utf-8")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(["cat", "dog", "bird"]), encoding="utf-8")
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"1": "dog", "0": "cat", "2": "bird"}), encoding="utf-8")

    for path in (text, as_list, as_dict):
        assert read_labels(path) == ["cat", "dog", "bird"]


def test_json_labels_with_gaps_raise(tmp_path):
    path = tmp_path / "gaps.json"
    path.write_text(json.dumps({"0": "cat", "2": "bird"}), encoding="utf-8")

    with pytest.raises(ValueError, match="without gaps"):
        read_labels(path)


def test_label_count_must_match_classes(digit_weights, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n", encoding="utf-8")

    with pytest.raises(ValueError, match="3 labels but the classifier has 10"):
        load_classifier(digit_weights[0], "digit_cnn", labels_path=labels)


def test_labels_file_names_classes(digit_weights, tmp_path):
    labels = tmp_path / "labels.json"
    names = [f"digit {digit}" for digit in range(10)]
    labels.write_text(json.dumps(names), encoding="utf-8")

    assert load_classifier(digit_weights[0], "digit_cnn", labels_path=labels).labels == names


def test_smoothed_classifier_votes_reproducibly(digit_weights):
    classifier = load_classifier(digit_weights[0], "digit_cnn", noise_sigma=0.25, vote_draws=70, vote_seed=3)
    images = torch.rand(3, 3, 32, 32)
    scores = classifier.class_scores(images)

    assert isinstance(classifier, SmoothedClassifier)
    assert torch.equal(scores, classifier.class_scores(images))
    assert torch.allclose(scores.sum(dim=1), torch.ones(3))
    # The shares are whole votes out of vote_draws.
    assert torch.allclose(scores * 70, (scores * 70).round(), atol=1e-4)


def test_smoothed_vote_matches_manual_count(digit_weights):
    classifier = load_classifier(digit_weights[0], "digit_cnn", noise_sigma=0.3, vote_draws=40, vote_seed=5)
    images = torch.rand(2, 3, 32, 32)

    generator = torch.Generator().manual_seed(5)
    noise = torch.randn((40 * 2, 3, 32, 32), generator=generator)
    with torch.no_grad():
        votes = classifier.base(images.repeat(40, 1, 1, 1) + 0.3 * noise).argmax(dim=1).view(40, 2)
    counts = torch.stack([torch.bincount(votes[:, i], minlength=10) for i in range(2)]).float()

    assert torch.allclose(classifier.class_scores(images), counts / 40)


def test_smoothing_rejects_bad_settings(digit_weights):
    with pytest.raises(ValueError, match="noise_sigma"):
        load_classifier(digit_weights[0], "digit_cnn", noise_sigma=-0.1)
    with pytest.raises(ValueError, match="vote_draws"):
        load_classifier(digit_weights[0], "digit_cnn", noise_sigma=0.1, vote_draws=0)
