"""Reproducibility nodes run through ComfyUI's executor on real ComfyUI models.

The tiny SD1.5 test model checks the mechanics: noise identity, batch
independence, rejection of stochastic samplers, noise files and interrupts.
The pack's embedded digit models A, B and C provide the evidence for the
method itself.
"""

import json
import threading

import pytest
import torch

TINY_SIZE = 16  # latent pixels; the tiny SD1.5 has 4 latent channels
TINY_STEPS = 3


def tiny_models_prompt(count: int = 3, start_seed: int = 0, batch_size: int = 3, sampler: str = "euler",
                       model_seeds: tuple[int, int] = (0, 1), labels: tuple[str, str] = ("A", "B"),
                       channels: int = 4, cfg: float = 1.0, batch_invariant: bool = False) -> dict:
    """Two tiny SD1.5 models compared from shared noise; the comparison node is "compare"."""
    return {
        "model_a": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": model_seeds[0]}},
        "model_b": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": model_seeds[1]}},
        "positive": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 1, "tokens": 4}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "noise": {"class_type": "LOCOSeedNoise",
                  "inputs": {"start_seed": start_seed, "count": count, "latent_channels": channels,
                             "latent_height": TINY_SIZE, "latent_width": TINY_SIZE}},
        "entry_a": {"class_type": "LOCOComparisonModel",
                    "inputs": {"model": ["model_a", 0], "vae": ["vae", 0], "label": labels[0],
                               "positive": ["positive", 0]}},
        "entry_b": {"class_type": "LOCOComparisonModel",
                    "inputs": {"model": ["model_b", 0], "vae": ["vae", 0], "label": labels[1],
                               "positive": ["positive", 0], "previous_models": ["entry_a", 0]}},
        "compare": {"class_type": "LOCOCompareModels",
                    "inputs": {"models": ["entry_b", 0], "noise": ["noise", 0], "sampler_name": sampler,
                               "scheduler": "normal", "steps": TINY_STEPS, "cfg": cfg, "batch_size": batch_size,
                               "metric": "ssim", "null_quantile": 0.99, "batch_invariant": batch_invariant,
                               "memorization_threshold_mode": "calibrate", "memorization_threshold": 0.9}},
    }


def comparison_outputs(result) -> dict:
    grid, heatmap, histogram, samples, report_json, summary = result.values("compare")
    return {"grid": grid, "heatmap": heatmap, "histogram": histogram, "samples": samples,
            "report": json.loads(report_json), "summary": summary}


@pytest.fixture(scope="module")
def tiny_comparison(comfy):
    """Two tiny models, seeds 0..2, sampled one seed per sampler call."""
    return comparison_outputs(comfy.run(tiny_models_prompt(batch_size=1), targets=["compare"]))


# --- registration and outputs ------------------------------------------------------


def test_reproducibility_nodes_registered(comfy):
    expected = {"LOCOSeedNoise", "LOCOSaveSeedNoise", "LOCOLoadSeedNoise", "LOCOComparisonModel", "LOCOCompareModels"}
    assert expected <= comfy.node_types()


def test_comparison_outputs_shapes(tiny_comparison):
    samples = tiny_comparison["samples"]
    # Two models x three seeds, pixel_space decodes the 16x16 latent to 16x16 RGB.
    assert samples.shape == (6, TINY_SIZE, TINY_SIZE, 3)
    for name in ("grid", "heatmap", "histogram"):
        picture = tiny_comparison[name]
        assert picture.ndim == 4
        assert picture.shape[0] == 1
        assert picture.shape[-1] == 3
        assert picture.min().item() >= 0.0
        assert picture.max().item() <= 1.0
    assert "RP A vs B" in tiny_comparison["summary"]


def test_report_records_run_settings(tiny_comparison):
    report = tiny_comparison["report"]
    settings = report["settings"]
    assert report["seeds"] == [0, 1, 2]
    assert report["models"] == ["A", "B"]
    assert settings["sampler"] == "euler"
    assert settings["scheduler"] == "normal"
    assert settings["steps"] == TINY_STEPS
    assert settings["cfg"] == 1.0
    assert settings["sigmas_identical"] is True
    assert len(settings["sigmas"]["A"]) == TINY_STEPS + 1
    assert settings["model_dtypes"]["A"].startswith("torch.")
    assert settings["device"]
    assert settings["attention_backend"]
    assert settings["torch_version"] == torch.__version__
    assert settings["comfyui_version"] != "unknown"
    for metric in ("ssim", "pixel_cosine", "mae"):
        entry = report["metrics"][metric]
        assert entry["null_pairs"] == 3 * 2
        assert 0.0 <= entry["roc_auc"] <= 1.0
        assert len(entry["pairs"][0]["matched_similarity"]) == 3


# --- identical noise and determinism ------------------------------------------------------


def test_samples_equal_ksampler_at_batch_one(comfy, tiny_comparison):
    # Seed k's noise is KSampler's noise for seed k at batch size 1, so a plain
    # KSampler + VAEDecode run must give the comparison's sample bit for bit.
    seed = 1
    prompt = tiny_models_prompt()
    prompt["latent"] = {"class_type": "EmptyLatentImage",
                        "inputs": {"width": TINY_SIZE * 8, "height": TINY_SIZE * 8, "batch_size": 1}}
    prompt["ksampler"] = {"class_type": "KSampler",
                          "inputs": {"model": ["model_a", 0], "positive": ["positive", 0],
                                     "negative": ["positive", 0], "latent_image": ["latent", 0], "seed": seed,
                                     "steps": TINY_STEPS, "cfg": 1.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0}}
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["vae", 0]}}
    (image,) = comfy.run(prompt, targets=["decode"]).values("decode")
    ours = tiny_comparison["samples"][seed]
    assert torch.equal(image[0, ..., :3], ours)


def test_batched_matches_one_by_one(comfy, tiny_comparison):
    # The noise is bit-identical whatever the batch layout. CPU kernels round
    # differently for different batch sizes, and the untrained tiny model
    # reaches latents of several hundred, so the decoded pixels may differ by
    # float rounding only: far below one 8-bit grey level (1/255).
    batched = comparison_outputs(comfy.run(tiny_models_prompt(batch_size=3), targets=["compare"]))
    difference = (batched["samples"] - tiny_comparison["samples"]).abs().max().item()
    assert difference < 1e-3


def test_batch_invariant_is_bit_identical(comfy):
    # One row per model call: seed k's arithmetic is the same in a batch of
    # three as alone, cond and uncond rows included (cfg 2 batches them).
    # Without the option the same comparison differs by float rounding on
    # this machine's CPU kernels (see the test above), so equality here
    # depends on the row-by-row evaluation.
    runs = {}
    for batch_size in (1, 3):
        prompt = tiny_models_prompt(batch_size=batch_size, cfg=2.0, batch_invariant=True)
        runs[batch_size] = comparison_outputs(comfy.run(prompt, targets=["compare"]))
    assert torch.equal(runs[1]["samples"], runs[3]["samples"])
    assert runs[3]["report"]["settings"]["batch_invariant"] is True
    assert runs[3]["report"]["settings"]["batch_size"] == 3


def test_batch_invariant_rejects_wrapped_model(comfy):
    # ChromaRadianceOptions (stock) installs a model function wrapper, which
    # the row-by-row evaluation would have to replace.
    from harness.inprocess import PromptExecutionError

    prompt = tiny_models_prompt(batch_invariant=True)
    prompt["wrapped_a"] = {"class_type": "ChromaRadianceOptions",
                           "inputs": {"model": ["model_a", 0], "preserve_wrapper": True, "start_sigma": 1.0,
                                      "end_sigma": 0.0, "nerf_tile_size": 0}}
    prompt["entry_a"]["inputs"]["model"] = ["wrapped_a", 0]
    with pytest.raises(PromptExecutionError, match="A: the model already has a model function wrapper"):
        comfy.run(prompt, targets=["compare"])


def test_same_seed_identical_across_runs(comfy, tiny_comparison):
    # A second run over seeds 2..3 (new noise input, so the node runs again)
    # must reproduce seed 2's samples of the first run bit for bit.
    shifted = comparison_outputs(comfy.run(tiny_models_prompt(count=2, start_seed=2, batch_size=1),
                                           targets=["compare"]))
    first_model_seed_2 = tiny_comparison["samples"][2]
    second_model_seed_2 = tiny_comparison["samples"][5]
    assert torch.equal(shifted["samples"][0], first_model_seed_2)
    assert torch.equal(shifted["samples"][2], second_model_seed_2)


def test_identical_models_reproduce_fully(comfy):
    # The same model twice: every matched pair is identical, so RP is 1 and
    # matched pairs separate perfectly from mismatched ones.
    prompt = tiny_models_prompt(model_seeds=(0, 0), labels=("A", "A again"))
    report = comparison_outputs(comfy.run(prompt, targets=["compare"]))["report"]
    for metric in ("ssim", "pixel_cosine", "mae"):
        assert report["metrics"][metric]["rp_matrix"][0][1] == 1.0
        assert report["metrics"][metric]["roc_auc"] == 1.0
        assert min(report["metrics"][metric]["pairs"][0]["matched_similarity"]) == pytest.approx(1.0, abs=1e-9)


def test_comfy_noise_drives_sampler_custom_advanced(comfy, tiny_comparison):
    # The NOISE output fed to SamplerCustomAdvanced gives the comparison's samples.
    prompt = tiny_models_prompt()
    prompt.update({
        "guider": {"class_type": "CFGGuider",
                   "inputs": {"model": ["model_a", 0], "positive": ["positive", 0], "negative": ["positive", 0],
                              "cfg": 1.0}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["model_a", 0], "scheduler": "normal", "steps": TINY_STEPS, "denoise": 1.0}},
        "custom": {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["noise", 1], "guider": ["guider", 0], "sampler": ["sampler", 0],
                              "sigmas": ["sigmas", 0], "latent_image": ["noise", 2]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["custom", 0], "vae": ["vae", 0]}},
    })
    (images,) = comfy.run(prompt, targets=["decode"]).values("decode")
    # SamplerCustomAdvanced samples the three seeds as one batch.
    assert (images[..., :3] - tiny_comparison["samples"][:3]).abs().max().item() < 1e-3


# --- rejected requests ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "lcm"])
def test_stochastic_sampler_rejected(comfy, sampler):
    from harness.inprocess import PromptExecutionError

    with pytest.raises(PromptExecutionError) as error:
        comfy.run(tiny_models_prompt(sampler=sampler), targets=["compare"])
    message = str(error.value)
    assert f"sampler '{sampler}' cannot be used" in message
    assert "choose a deterministic sampler: euler, " in message


def test_channel_mismatch_rejected(comfy):
    from harness.inprocess import PromptExecutionError

    with pytest.raises(PromptExecutionError, match="A has 4-channel latents but the noise has 3 channels"):
        comfy.run(tiny_models_prompt(channels=3), targets=["compare"])


def test_duplicate_labels_rejected(comfy):
    from harness.inprocess import PromptExecutionError

    with pytest.raises(PromptExecutionError, match="model labels must be unique"):
        comfy.run(tiny_models_prompt(labels=("same", "same")), targets=["compare"])


def test_interrupt_stops_between_seeds(comfy):
    from harness.inprocess import PromptInterruptedError

    # Interrupt as soon as the comparison reports its first progress.
    interrupted = threading.Event()

    def on_event(event, data):
        if event == "progress" and isinstance(data, dict) and data.get("node") == "compare" \
                and not interrupted.is_set():
            interrupted.set()
            comfy.interrupt()

    prompt = tiny_models_prompt(count=4, start_seed=100, batch_size=1)
    with pytest.raises(PromptInterruptedError) as error:
        comfy.run(prompt, targets=["compare"], on_event=on_event)
    assert interrupted.is_set()
    assert error.value.node_id == "compare"


# --- noise files ---------------------------------------------------------------------------


def save_noise_prompt(prefix: str, start_seed: int = 7) -> dict:
    return {
        "noise": {"class_type": "LOCOSeedNoise",
                  "inputs": {"start_seed": start_seed, "count": 2, "latent_channels": 3, "latent_height": 4,
                             "latent_width": 4}},
        "save": {"class_type": "LOCOSaveSeedNoise", "inputs": {"noise": ["noise", 0], "filename_prefix": prefix}},
    }


def test_noise_file_round_trip_and_no_overwrite(comfy):
    first = comfy.run(save_noise_prompt("loco_noise_test/noise"), targets=["save"])
    (first_name,) = first.values("save")
    assert first_name == "loco_noise_test/noise_00001.safetensors [output]"
    assert (comfy.output_dir / "loco_noise_test" / "noise_00001.safetensors").is_file()

    # Different seeds under the same prefix go to a new file; the first is untouched.
    before = (comfy.output_dir / "loco_noise_test" / "noise_00001.safetensors").read_bytes()
    (second_name,) = comfy.run(save_noise_prompt("loco_noise_test/noise", start_seed=8), targets=["save"]).values("save")
    assert second_name == "loco_noise_test/noise_00002.safetensors [output]"
    assert (comfy.output_dir / "loco_noise_test" / "noise_00001.safetensors").read_bytes() == before

    load = {"load": {"class_type": "LOCOLoadSeedNoise", "inputs": {"filename": first_name}}}
    loaded, comfy_noise, latent = comfy.run(load, targets=["load"]).values("load")
    original = first.values("noise")[0]
    assert loaded.seeds == (7, 8)
    assert torch.equal(loaded.noise, original.noise)
    assert comfy_noise.seed == 7
    assert torch.equal(comfy_noise.generate_noise(latent), original.noise)


@pytest.mark.parametrize("prefix", ["../escape/noise", "/tmp/loco_absolute_noise", "a/../../escape"])
def test_save_noise_rejects_path_traversal(comfy, prefix):
    from harness.inprocess import PromptExecutionError

    with pytest.raises(PromptExecutionError, match="relative path inside"):
        comfy.run(save_noise_prompt(prefix), targets=["save"])


@pytest.mark.parametrize("filename", ["../secret.safetensors", "/etc/passwd", "x/../../secret.safetensors [output]"])
def test_load_noise_rejects_path_traversal(comfy, filename):
    from harness.inprocess import PromptExecutionError

    load = {"load": {"class_type": "LOCOLoadSeedNoise", "inputs": {"filename": filename}}}
    with pytest.raises(PromptExecutionError, match="relative path inside"):
        comfy.run(load, targets=["load"])


def test_load_noise_missing_file_named(comfy):
    from harness.inprocess import PromptExecutionError

    load = {"load": {"class_type": "LOCOLoadSeedNoise", "inputs": {"filename": "no_such_noise.safetensors"}}}
    with pytest.raises(PromptExecutionError, match="seed-noise file 'no_such_noise.safetensors' not found"):
        comfy.run(load, targets=["load"])


# --- CLIP vision embeddings ----------------------------------------------------------------


def test_embedding_metric_with_clip_vision(comfy, tiny_comparison):
    # A small ComfyUI ClipVisionModel from the test node pack, because no
    # CLIP vision checkpoint is available offline.
    prompt = tiny_models_prompt(batch_size=1)
    prompt["clip_vision"] = {"class_type": "LOCOTestTinyCLIPVision", "inputs": {"seed": 0}}
    prompt["compare"]["inputs"].update(metric="embedding_cosine", clip_vision=["clip_vision", 0])

    output = comparison_outputs(comfy.run(prompt, targets=["compare"]))

    report = output["report"]
    assert torch.equal(output["samples"], tiny_comparison["samples"])
    entry = report["metrics"]["embedding_cosine"]
    assert entry["null_pairs"] == 6
    assert all(-1.0 - 1e-9 <= value <= 1.0 + 1e-9 for value in entry["pairs"][0]["matched_similarity"])
    assert report["shown_metric"] == "embedding_cosine"
    assert "metric embedding_cosine" in output["summary"]
    # Different images must not all embed to the same vector.
    assert len({round(value, 6) for value in entry["pairs"][0]["matched_similarity"]}) > 1


def test_embedding_metric_without_clip_vision_rejected(comfy):
    from harness.inprocess import PromptExecutionError

    prompt = tiny_models_prompt()
    prompt["compare"]["inputs"]["metric"] = "embedding_cosine"
    with pytest.raises(PromptExecutionError, match="needs a CLIP vision model on the clip_vision input"):
        comfy.run(prompt, targets=["compare"])


# --- the embedded digit models: reproducibility and memorization ----------------------------

DIGIT_MODELS = {"A": "pack/loco_digits_a.safetensors", "B": "pack/loco_digits_b.safetensors",
                "C": "pack/loco_digits_c.safetensors"}
DIGIT_SEEDS = 6
DIGIT_STEPS = 20


def require_digit_models():
    from pathlib import Path

    models_dir = Path(__file__).resolve().parents[2] / "assets" / "models"
    missing = [name for name in DIGIT_MODELS.values() if not (models_dir / name.split("/", 1)[1]).is_file()]
    if missing:
        pytest.skip(f"embedded digit models missing from assets/models: {', '.join(missing)}")


def digits_prompt(labels=("A", "B", "C"), count: int = DIGIT_SEEDS, batch_size: int = DIGIT_SEEDS,
                  training_folder: str = "", batch_invariant: bool = False) -> dict:
    prompt = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "noise": {"class_type": "LOCOSeedNoise",
                  "inputs": {"start_seed": 0, "count": count, "latent_channels": 3, "latent_height": 32,
                             "latent_width": 32}},
    }
    previous = None
    for label in labels:
        prompt[f"load_{label}"] = {"class_type": "LOCOLoadDiffusionModel",
                                   "inputs": {"model_name": DIGIT_MODELS[label], "weight_dtype": "default"}}
        entry = {"model": [f"load_{label}", 0], "vae": ["vae", 0], "label": label}
        if previous is not None:
            entry["previous_models"] = [previous, 0]
        prompt[f"entry_{label}"] = {"class_type": "LOCOComparisonModel", "inputs": entry}
        previous = f"entry_{label}"
    prompt["compare"] = {"class_type": "LOCOCompareModels",
                         "inputs": {"models": [previous, 0], "noise": ["noise", 0], "sampler_name": "euler",
                                    "scheduler": "karras", "steps": DIGIT_STEPS, "cfg": 1.0,
                                    "batch_size": batch_size, "metric": "ssim", "null_quantile": 0.99,
                                    "memorization_threshold_mode": "calibrate", "memorization_threshold": 0.9,
                                    "training_folder": training_folder, "batch_invariant": batch_invariant}}
    return prompt


@pytest.fixture(scope="module")
def memorize_folder(comfy):
    """The 64 images model C was trained on, written as PNG files to input/loco_digits_memorize."""
    import numpy as np
    from PIL import Image

    from loco_core.digits import load_digits

    folder = comfy.input_dir / "loco_digits_memorize"
    folder.mkdir(exist_ok=True)
    images, _ = load_digits("memorize")
    for index, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    return folder.name


@pytest.fixture(scope="module")
def digit_comparison(comfy, memorize_folder):
    require_digit_models()
    return comparison_outputs(comfy.run(digits_prompt(training_folder=memorize_folder), targets=["compare"]))


def test_digit_models_a_and_b_reproduce(digit_comparison):
    report = digit_comparison["report"]
    for metric in ("ssim", "pixel_cosine"):
        entry = report["metrics"][metric]
        rp_a_b = entry["rp_matrix"][0][1]
        # The baseline is the rate at which mismatched seeds pass the threshold.
        assert rp_a_b >= 0.75, digit_comparison["summary"]
        assert rp_a_b >= entry["null_exceed_rate"] + 0.5
        assert entry["roc_auc"] >= 0.9


def test_digit_model_c_memorizes_and_a_does_not(digit_comparison):
    memorization = digit_comparison["report"]["metrics"]["ssim"]["memorization"]
    by_model = {entry["model"]: entry for entry in memorization["models"]}
    assert memorization["threshold_source"] == "training nearest-neighbour null"
    assert by_model["C"]["memorized_fraction"] >= 0.75, digit_comparison["summary"]
    assert by_model["A"]["memorized_fraction"] <= 0.25, digit_comparison["summary"]
    assert by_model["A"]["generalization_score"] == pytest.approx(1.0 - by_model["A"]["memorized_fraction"])


def test_digit_memorization_report_consistent(digit_comparison):
    # Whatever the models learned, the memorization entries must agree with
    # their own numbers: GL = 1 - memorized fraction, flags = similarity above
    # the threshold, indices inside the 64 training images.
    memorization = digit_comparison["report"]["metrics"]["ssim"]["memorization"]
    threshold = memorization["threshold"]
    assert memorization["null_queries"] == 64
    for entry in memorization["models"]:
        flags = [value > threshold for value in entry["nearest_training_similarity"]]
        assert entry["memorized"] == flags
        # The report rounds its numbers to 6 decimals.
        assert entry["memorized_fraction"] == pytest.approx(sum(flags) / DIGIT_SEEDS, abs=1e-6)
        assert entry["generalization_score"] == pytest.approx(1.0 - entry["memorized_fraction"], abs=1e-6)
        assert all(0 <= index < 64 for index in entry["nearest_training_index"])


def test_digit_models_batched_match_one_by_one(comfy, digit_comparison):
    # Seeds 0 and 1 one per sampler call against the same seeds inside the
    # batch of six. The noise is bit-identical; batched CPU kernels may round
    # differently, far below one 8-bit grey level.
    count = 2
    one_by_one = comparison_outputs(comfy.run(digits_prompt(labels=("A", "B"), count=count, batch_size=1),
                                              targets=["compare"]))["samples"]
    batched = digit_comparison["samples"]
    for model in range(2):
        difference = one_by_one[model * count:(model + 1) * count] - batched[model * DIGIT_SEEDS:][:count]
        assert difference.abs().max().item() < 1e-4


def test_digit_models_batch_invariant_bit_identical(comfy):
    # The same two seeds alone and inside a batch of three, with the model and
    # the VAE run one row at a time: bit for bit equal.
    runs = {}
    for batch_size in (1, 3):
        prompt = digits_prompt(labels=("A", "B"), count=3, batch_size=batch_size, batch_invariant=True)
        runs[batch_size] = comparison_outputs(comfy.run(prompt, targets=["compare"]))["samples"]
    assert torch.equal(runs[1], runs[3])
