"""Attack nodes through ComfyUI's executor: salience mask, classifier loader, dual PGD, classification."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CLASSIFIER = REPO_ROOT / "assets" / "models" / "digit_cnn.safetensors"
TINY_CLASSIFIER = "loco_test_tiny_cnn.safetensors"
LABELS_FILE = "loco_test_digit_names.json"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_sweep_script():
    spec = importlib.util.spec_from_file_location("attack_success_table", REPO_ROOT / "scripts" / "attack_success_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tiny_digit_cnn():
    """A small DigitCNN trained for a few seconds on 2,000 digits (seeded; about 90% held-out accuracy)."""
    from loco_core.digit_cnn import DigitCNN, DigitCNNConfig
    from loco_core.digits import load_digits

    images, labels = load_digits("train")
    subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[:2000]
    images, labels = images[subset], labels[subset]
    config = DigitCNNConfig(widths=(8, 16, 16), hidden=32)
    torch.manual_seed(0)
    model = DigitCNN(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for batch in torch.randperm(len(labels), generator=generator).split(32):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model, config


@pytest.fixture(scope="module")
def tiny_classifier(comfy):
    """Write a small trained DigitCNN and a labels file into models/classifiers; return the weights name."""
    from safetensors.torch import save_file

    folder = Path(comfy.models_dir) / "classifiers"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False):
        model, config = train_tiny_digit_cnn()
    save_file(model.state_dict(), str(folder / TINY_CLASSIFIER), metadata={"digit_cnn_config": config.to_json()})
    (folder / LABELS_FILE).write_text(json.dumps(DIGIT_NAMES), encoding="utf-8")
    return TINY_CLASSIFIER


@pytest.fixture(scope="module")
def rgba_image(comfy):
    """Input files: a 3-page TIFF of held-out digits (one batch in LoadImage) and an RGBA PNG digit."""
    from loco_core.digits import load_digits

    images, labels = load_digits("heldout")
    picks = [int(torch.nonzero(labels == digit)[0]) for digit in (2, 4, 9)]
    frames = [Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")
              for i in picks]
    frames[0].save(Path(comfy.input_dir) / "loco_digits.tiff", save_all=True, append_images=frames[1:])
    rng = np.random.default_rng(0)
    alpha = (rng.random((32, 32, 1)) * 255).astype(np.uint8)
    rgba = np.concatenate([np.asarray(frames[0]), alpha], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(Path(comfy.input_dir) / "loco_rgba.png")
    return "loco_digits.tiff", "loco_rgba.png"


def loader(weights: str, labels: str = "none (class indices)", noise_sigma: float = 0.0) -> dict:
    return {"class_type": "LOCOLoadClassifier",
            "inputs": {"weights": weights, "architecture": "digit_cnn", "labels": labels,
                       "noise_sigma": noise_sigma, "vote_draws": 64, "vote_seed": 0}}


def attack(image, mask, **overrides) -> dict:
    inputs = {"classifier": ["1", 0], "image": image, "foreground": mask, "norm": "linf",
              "eps_foreground": 0.01, "eps_background": 0.1, "steps": 4, "step_foreground": 0.0,
              "step_background": 0.0, "restarts": 1, "random_start": True, "mode": "untargeted", "labels": "",
              "target": "", "eot_draws": 2, "salience_weight": 0.0, "seed": 0, "perturbation_gain": 10.0}
    inputs.update(overrides)
    return {"class_type": "LOCODualPGDAttack", "inputs": inputs}


def salience(image, rule: str = "top_fraction") -> dict:
    return {"class_type": "LOCOSalienceMask",
            "inputs": {"image": image, "rule": rule, "top_fraction": 0.3, "threshold": 0.5, "blur": 0.05,
                       "work_size": 64}}


def test_attack_nodes_registered(comfy):
    assert {"LOCOSalienceMask", "LOCOLoadClassifier", "LOCOClassifyImage", "LOCODualPGDAttack"} <= comfy.node_types()


def test_salience_mask_node_outputs(comfy, rgba_image):
    prompt = {"2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}}, "3": salience(["2", 0])}
    foreground, salience_map = comfy.run(prompt, targets=["3"]).values("3")

    assert foreground.shape == (3, 32, 32)
    assert set(foreground.unique().tolist()) <= {0.0, 1.0}
    assert foreground.mean(dim=(1, 2)).tolist() == pytest.approx([0.3] * 3, abs=0.01)
    assert salience_map.shape == (3, 32, 32)
    assert salience_map.amax(dim=(1, 2)).tolist() == pytest.approx([1.0] * 3)


def test_dual_attack_graph_outputs(comfy, tiny_classifier, rgba_image):
    prompt = {
        "1": loader(tiny_classifier, labels=LABELS_FILE),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], eps_foreground=0.01, eps_background=0.1, restarts=2),
    }
    result = comfy.run(prompt, targets=["4"])
    adversarial, perturbation, report_text, summary = result.values("4")
    source = result.values("2")[0]
    mask = result.values("3")[0].bool()
    report = json.loads(report_text)

    assert adversarial.shape == source.shape == (3, 32, 32, 3)
    assert perturbation.shape == (3, 32, 32, 3)
    assert adversarial.min() >= 0
    assert adversarial.max() <= 1
    delta = (adversarial - source).abs()
    assert delta[mask].max() <= 0.01 + 1e-6
    assert delta[~mask].max() <= 0.1 + 1e-6
    assert delta[~mask].max() > 0.05
    assert torch.allclose(perturbation, (0.5 + 10 * (adversarial - source)).clamp(0, 1), atol=1e-5)
    assert len(report["images"]) == 3
    assert report["settings"]["restarts"] == 2
    assert report["images"][0]["clean_prediction_name"] in DIGIT_NAMES
    assert "success" in summary
    assert summary.count("\n#") == 3


def test_alpha_channel_passes_through(comfy, tiny_classifier, rgba_image):
    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[1]}},
        "5": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["2", 1]}},
        "3": salience(["5", 0]),
        "4": attack(["5", 0], ["3", 0]),
    }
    result = comfy.run(prompt, targets=["4"])
    rgba = result.values("5")[0]
    adversarial, perturbation, _, _ = result.values("4")

    assert rgba.shape[-1] == 4
    assert adversarial.shape == rgba.shape
    assert torch.equal(adversarial[..., 3], rgba[..., 3])
    assert perturbation.shape[-1] == 3
    assert (adversarial[..., :3] - rgba[..., :3]).abs().max() > 0


def test_single_mask_applies_to_batch(comfy, tiny_classifier, rgba_image):
    # SolidMask gives one [1, H, W] mask; value 0 puts every pixel in the background.
    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}},
        "4": attack(["2", 0], ["3", 0], eps_background=0.0),
    }
    result = comfy.run(prompt, targets=["4"])
    adversarial = result.values("4")[0]

    assert adversarial.shape[0] == 3
    assert torch.equal(adversarial, result.values("2")[0])


def test_mask_size_mismatch_names_fix(comfy, tiny_classifier, rgba_image):
    from harness.inprocess import PromptExecutionError

    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 32}},
        "4": attack(["2", 0], ["3", 0]),
    }
    with pytest.raises(PromptExecutionError, match="resize the mask or the image"):
        comfy.run(prompt, targets=["4"])


def test_targeted_mode_reaches_named_target(comfy, tiny_classifier, rgba_image):
    prompt = {
        "1": loader(tiny_classifier, labels=LABELS_FILE),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], mode="targeted", target="seven", eps_foreground=0.03, eps_background=0.3, steps=20),
    }
    report = json.loads(comfy.run(prompt, targets=["4"]).values("4")[2])

    for record in report["images"]:
        assert record["target"] == 7
        assert record["success"] == (record["adversarial_prediction"] == 7)
    assert any(record["success"] for record in report["images"])


def test_targeted_mode_without_target_raises(comfy, tiny_classifier, rgba_image):
    from harness.inprocess import PromptExecutionError

    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], mode="targeted"),
    }
    with pytest.raises(PromptExecutionError, match="target is empty"):
        comfy.run(prompt, targets=["4"])


def test_labels_count_mismatch_raises(comfy, tiny_classifier, rgba_image):
    from harness.inprocess import PromptExecutionError

    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], labels="1, 2"),
    }
    with pytest.raises(PromptExecutionError, match="2 entries but the batch has 3"):
        comfy.run(prompt, targets=["4"])


def test_smoothed_classifier_attack_reports_votes(comfy, tiny_classifier, rgba_image):
    prompt = {
        "1": loader(tiny_classifier, noise_sigma=0.1),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], eot_draws=4),
    }
    report = json.loads(comfy.run(prompt, targets=["4"]).values("4")[2])

    for record in report["images"]:
        # Confidence of a smoothed classifier is a vote share out of 64 draws.
        assert record["adversarial_confidence"] * 64 == pytest.approx(round(record["adversarial_confidence"] * 64))


def test_classify_node_lists_predictions(comfy, tiny_classifier, rgba_image):
    prompt = {
        "1": loader(tiny_classifier, labels=LABELS_FILE),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "6": {"class_type": "LOCOClassifyImage", "inputs": {"classifier": ["1", 0], "image": ["2", 0]}},
    }
    records = json.loads(comfy.run(prompt, targets=["6"]).values("6")[0])

    assert len(records) == 3
    assert records[0]["label"] == DIGIT_NAMES[records[0]["prediction"]]
    assert len(records[0]["top"]) == 5


def test_pickle_weights_are_not_offered(comfy, tiny_classifier):
    from harness.inprocess import PromptExecutionError, PromptValidationError

    folder = Path(comfy.models_dir) / "classifiers"
    (folder / "loco_test_pickle.pt").write_bytes(b"never loaded")
    schema = comfy.node_class("LOCOLoadClassifier").define_schema()
    weights_input = next(item for item in schema.inputs if item.id == "weights")

    assert TINY_CLASSIFIER in weights_input.options
    assert "loco_test_pickle.pt" not in weights_input.options
    # A prompt naming the file anyway is rejected before anything is read.
    with pytest.raises((PromptValidationError, PromptExecutionError), match="unpickling can run code"):
        comfy.run({"1": loader("loco_test_pickle.pt")}, targets=["1"])


def test_attack_stops_on_interrupt(comfy, tiny_classifier, rgba_image):
    from harness.inprocess import PromptInterruptedError

    progress = []

    def interrupt_after_two_steps(event, data):
        if event == "progress" and data.get("node") == "4":
            progress.append(data["value"])
            if data["value"] == 2:
                comfy.interrupt()

    prompt = {
        "1": loader(tiny_classifier),
        "2": {"class_type": "LoadImage", "inputs": {"image": rgba_image[0]}},
        "3": salience(["2", 0]),
        "4": attack(["2", 0], ["3", 0], steps=50, seed=123),
    }
    with pytest.raises(PromptInterruptedError):
        comfy.run(prompt, targets=["4"], on_event=interrupt_after_two_steps)

    assert progress and max(progress) < 50


@pytest.mark.skipif(not SHIPPED_CLASSIFIER.is_file(), reason="assets/models/digit_cnn.safetensors is not shipped")
def test_success_rises_with_background_budget(comfy):
    # 100 held-out digits, eps_F = 2/255 fixed, eps_B from 0 to 0.3; the
    # same sweep that scripts/attack_success_table.py writes into the docs.
    sweep = load_sweep_script()
    rows = sweep.run_sweep(comfy, per_class=10)
    rates = {row["eps_background"]: row["success_rate"] for row in rows}

    assert set(rates) >= {0.0, 0.1, 0.2, 0.3}
    assert all(row["images"] == 100 for row in rows)
    assert rows[0]["clean_accuracy"] >= 0.9
    assert rates[0.0] <= 0.1
    ordered = [rates[eps] for eps in sorted(rates)]
    assert all(later >= earlier for earlier, later in zip(ordered, ordered[1:]))
    assert rates[0.3] >= 0.9


@pytest.mark.skipif(not SHIPPED_CLASSIFIER.is_file(), reason="assets/models/digit_cnn.safetensors is not shipped")
def test_salience_weight_lowers_background_salience(comfy):
    sweep = load_sweep_script()
    plain, penalised = sweep.run_salience_sweep(comfy, per_class=10, weights=(0.0, 10.0))

    assert penalised["background_salience_adversarial"] < plain["background_salience_adversarial"] - 0.1
    assert plain["background_salience_adversarial"] > plain["background_salience_clean"]
