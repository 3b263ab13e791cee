"""LOCO nodes on a model conditioned by a stock ComfyUI ControlNet.

A fixture builds a small ControlNet with ComfyUI's own class
(comfy.cldm.cldm.ControlNet) in the configuration of the tiny SD1.5 UNet and
saves it as safetensors in models/controlnet. The graphs load it with the
stock ControlNetLoader and attach it to both conditionings with the stock
ControlNetApplyAdvanced, with a hint image of the image's size (a white
square on black, from MaskToImage).

ComfyUI adds the ControlNet residuals inside the UNet in place (``h += ctrl``),
and the stock loader creates the ControlNet's weights inside inference mode.
Both break reverse mode but not forward mode, so these tests record what each
VJP strategy of LOCO Find Edit Directions does with a ControlNet attached.
"""

import importlib
import json
import logging

import pytest
import torch

CONTROLNET_NAME = "loco_tiny_sd15_controlnet.safetensors"

# The stock loader finds no supported model with the tiny configuration, so it
# builds the ControlNet from comfy.supported_models_base.BASE, which sets 64
# channels per attention head. At the tiny model's default 32 channels that
# gives zero heads, so the UNet and its ControlNet use 64 channels here.
MODEL_CHANNELS = 64

# Channels of the RGB hint image, which the first conv of input_hint_block reads.
HINT_CHANNELS = 3

# Image side in pixels. The latent, the hint image and the mask follow from it.
IMAGE_SIZE = 64

# Each LOCO node here runs at CFG 1 except the posterior-mean check, which uses
# CFG above 1 so the ControlNet acts on both the positive and negative pass.
POSTERIOR_CFG = 3.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's graphs on one intra-op thread, then restore the setting.

    The Jacobian passes run thousands of small kernels. On a machine with
    more busy processes than cores, each kernel waits for a descheduled second
    thread: one Find Directions run here took 104 s on two threads and 8 s on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def seeded_controlnet_state_dict(template: dict, seed: int) -> dict:
    """Draw a value for every tensor of a ControlNet state dict from ``seed``.

    Kernels get normal values over sqrt(fan_in), which keeps activations near
    unit scale. The zero convs are kernels too, so they are non-zero and the
    control changes the UNet's output. Norm scales are 1 and biases small.
    """
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for key in sorted(template):
        shape = template[key].shape
        if key.endswith("weight") and len(shape) >= 2:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            values[key] = torch.randn(shape, generator=generator) / fan_in ** 0.5
        elif key.endswith("weight"):
            values[key] = torch.ones(shape)
        else:
            values[key] = 0.01 * torch.randn(shape, generator=generator)
    return values


@pytest.fixture(scope="module")
def controlnet_name(comfy):
    """Write a seeded ControlNet for the tiny SD1.5 UNet into models/controlnet and return its file name."""
    from safetensors.torch import save_file

    cldm = importlib.import_module("comfy.cldm.cldm")
    model_patcher = comfy.run(
        {"1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0, "model_channels": MODEL_CHANNELS}}},
        targets=["1"],
    ).values("1")[0]

    # The ControlNet copies the UNet's encoder, so its configuration is the
    # UNet's own, less the decoder's output channels, plus the hint channels.
    config = dict(model_patcher.model.model_config.unet_config)
    config.pop("out_channels")
    config["hint_channels"] = HINT_CHANNELS
    control_model = cldm.ControlNet(**config)
    tensors = seeded_controlnet_state_dict(control_model.state_dict(), seed=5)

    # Keys without a prefix and with zero_convs.* are the layout the stock
    # loader detects as an original (non-diffusers) ControlNet.
    assert "zero_convs.0.0.weight" in tensors
    assert tensors["input_hint_block.0.weight"].shape[1] == HINT_CHANNELS
    save_file({key: value.contiguous() for key, value in tensors.items()},
              str(comfy.models_dir / "controlnet" / CONTROLNET_NAME))
    return CONTROLNET_NAME


def controlnet_prompt(controlnet_name: str) -> dict:
    """Build the API prompt of the ControlNet-conditioned graph.

    Node ids: "1" tiny SD1.5 (64 channels), "2" and "3" plain positive and
    negative, "5" an image latent sampled with the ControlNet. "13" is a white
    square of half the image side centred on a black mask, and "7" that mask
    as the hint image. "9" outputs the conditionings with the ControlNet
    applied (positive 0, negative 1).
    """
    half = IMAGE_SIZE // 2
    return {
        "1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0, "model_channels": MODEL_CHANNELS}},
        "2": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 1, "tokens": 4}},
        "3": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 2, "tokens": 4}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["4", 0],
            "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "MaskToImage", "inputs": {"mask": ["13", 0]}},
        "8": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_name}},
        "9": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["7", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": IMAGE_SIZE, "height": IMAGE_SIZE}},
        "12": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": half, "height": half}},
        "13": {"class_type": "MaskComposite", "inputs": {
            "destination": ["11", 0], "source": ["12", 0], "x": half // 2, "y": half // 2, "operation": "add"}},
    }


def controlled(cfg: float) -> dict:
    """Return the model, ControlNet conditionings and CFG inputs that the LOCO nodes share."""
    return {"model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1], "cfg": cfg}


def find_directions_prompt(controlnet_name: str, vjp_strategy: str) -> dict:
    """Build the ControlNet graph plus LOCO Invert ("10") and Find Directions ("14")."""
    prompt = controlnet_prompt(controlnet_name)
    shared = controlled(cfg=1.0)
    prompt["10"] = {"class_type": "LOCOInvert", "inputs": {
        **shared, "latent": ["5", 0], "edit_level": 0.6, "steps": 4}}
    prompt["14"] = {"class_type": "LOCOFindDirections", "inputs": {
        **shared, "inversion": ["10", 0], "mask": ["13", 0], "rank": 2, "null_rank": 2, "max_rounds": 3,
        "tolerance": 0.01, "seed": 0, "batch_index": 0, "jvp_strategy": "auto", "vjp_strategy": vjp_strategy}}
    return prompt


def relative_max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_posterior_mean_matches_sampler_with_controlnet(comfy, controlnet_name):
    prompt = controlnet_prompt(controlnet_name)
    prompt["20"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["1", 0], "scheduler": "normal", "steps": 1, "denoise": 0.6}}
    prompt["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    # SamplerCustom on the schedule [sigma, 0] reports the denoised prediction at sigma.
    prompt["22"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": POSTERIOR_CFG,
        "positive": ["9", 0], "negative": ["9", 1], "sampler": ["21", 0], "sigmas": ["20", 0],
        "latent_image": ["5", 0]}}
    mean_inputs = {"latent": ["5", 0], "sigmas": ["20", 0], "noise_seed": 7}
    prompt["23"] = {"class_type": "LOCOPosteriorMean", "inputs": {**controlled(POSTERIOR_CFG), **mean_inputs}}
    prompt["24"] = {"class_type": "LOCOPosteriorMean", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": POSTERIOR_CFG, **mean_inputs}}

    result = comfy.run(prompt, targets=["22", "23", "24"])

    expected = result.values("22")[1]["samples"]
    with_control = result.values("23")[0]["samples"]
    without_control = result.values("24")[0]["samples"]
    assert expected.shape == (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert with_control.shape == expected.shape
    assert torch.isfinite(with_control).all()
    # The ControlNet must reach the denoiser, or the checks below prove nothing.
    assert relative_max_difference(with_control, without_control) > 1e-2
    assert relative_max_difference(with_control, expected) < 1e-6


@pytest.fixture(scope="module")
def logged_warnings():
    """Collect the warnings logged while this module's shared runs execute.

    pytest's caplog fixture is function-scoped, so it cannot see a run made
    by a module-scoped fixture.
    """
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


@pytest.fixture(scope="module")
def auto_run(comfy, controlnet_name, logged_warnings):
    """Run Find Directions with vjp_strategy "auto" on the ControlNet graph."""
    return comfy.run(find_directions_prompt(controlnet_name, "auto"), targets=["14"])


def test_auto_vjp_falls_back_with_controlnet(auto_run, logged_warnings):
    directions, _, report = auto_run.values("14")

    flat = directions.vectors.reshape(directions.rank, -1).double()
    assert directions.rank == 2
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(flat @ flat.T, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.isfinite(directions.singular_values).all()

    # Forward mode runs through the ControlNet and the in-place residual
    # addition, so the JVP needs no fallback. Reverse mode fails at the first
    # VJP because the stock loader created the ControlNet's weights inside
    # inference mode. The adapter puts its reverse-mode weight wrappers on the
    # UNet's layers only, so autograd cannot save the ControlNet's weights.
    # With ordinary weights swapped in by hand, the backward pass still
    # failed, on the in-place h += ctrl. "auto" therefore uses the symmetric
    # approximation J^T u = J u and logs a warning.
    control_net = auto_run.values("8")[0]
    assert all(weight.is_inference() for weight in control_net.control_model.parameters())
    strategies = directions.parameters["strategies"]
    assert strategies == {"jvp": "forward", "vjp": "symmetric"}
    assert json.loads(report)["parameters"]["strategies"] == strategies
    fallback = [record.getMessage() for record in logged_warnings
                if "reverse-mode VJP failed" in record.getMessage()]
    assert fallback, "the symmetric fallback was used without the logged warning"
    assert "Inference tensors cannot be saved for backward" in fallback[0]


def test_reverse_vjp_fails_with_controlnet(comfy, controlnet_name):
    from harness.inprocess import PromptExecutionError

    with pytest.raises(PromptExecutionError) as raised:
        comfy.run(find_directions_prompt(controlnet_name, "reverse"), targets=["14"])

    message = str(raised.value)
    assert "LOCOFindDirections" in message
    assert "reverse-mode VJP failed" in message
    # The observed cause is the ControlNet's inference-mode weights (see the test above).
    assert "Inference tensors cannot be saved for backward" in message
    # The message names the way out.
    assert "Set vjp_strategy to 'auto' or 'symmetric'" in message


def test_batch_invariant_rejects_controlnet(comfy, controlnet_name):
    # The control signal is computed once for the whole batch, so a
    # row-by-row comparison cannot make it batch independent, and the node raises an error.
    from harness.inprocess import PromptExecutionError

    prompt = controlnet_prompt(controlnet_name)
    latent_size = IMAGE_SIZE // 8
    prompt.update({
        "20": {"class_type": "LOCOSeedNoise", "inputs": {"start_seed": 0, "count": 2, "latent_channels": 4,
                                                         "latent_height": latent_size, "latent_width": latent_size}},
        "21": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "22": {"class_type": "LOCOComparisonModel", "inputs": {
            "model": ["1", 0], "vae": ["21", 0], "label": "A", "positive": ["9", 0], "negative": ["9", 1]}},
        "23": {"class_type": "LOCOComparisonModel", "inputs": {
            "model": ["1", 0], "vae": ["21", 0], "label": "B", "previous_models": ["22", 0]}},
        "24": {"class_type": "LOCOCompareModels", "inputs": {
            "models": ["23", 0], "noise": ["20", 0], "sampler_name": "euler", "scheduler": "normal", "steps": 2,
            "cfg": 2.0, "batch_size": 2, "metric": "ssim", "null_quantile": 0.99, "batch_invariant": True,
            "memorization_threshold_mode": "calibrate", "memorization_threshold": 0.9}},
    })
    with pytest.raises(PromptExecutionError, match="batch_invariant does not cover ControlNet conditioning"):
        comfy.run(prompt, targets=["24"])
