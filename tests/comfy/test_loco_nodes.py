"""LOCO edit nodes through ComfyUI's executor, on a small SD1.5-architecture model.

The graph: tiny SD1.5 UNet (ComfyUI's own classes, weights made in inference
mode) -> KSampler makes a 64x64 image latent (8x8x4) -> LOCO Invert -> Find
Directions inside a 32x32 pixel square -> Apply, Sweep, Transfer, Compose.
"""

import json
import sys

import pytest
import torch

LATENT_SQUARE = (slice(2, 6), slice(2, 6))


def model_nodes(lora_name=None, cfg=1.0):
    """Nodes 1-5 (model, conditionings, empty latent, KSampler at 64x64) plus the mask nodes 11-13."""
    prompt = {
        "1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0}},
        "2": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 1, "tokens": 4}},
        "3": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 2, "tokens": 4}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "12": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "13": {"class_type": "MaskComposite", "inputs": {
            "destination": ["11", 0], "source": ["12", 0], "x": 16, "y": 16, "operation": "add"}},
    }
    if lora_name is not None:
        prompt["6"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}
    model = ["6", 0] if lora_name is not None else ["1", 0]
    shared = {"model": model, "positive": ["2", 0], "negative": ["3", 0], "cfg": cfg}
    prompt["10"] = {"class_type": "LOCOInvert", "inputs": {
        **shared, "latent": ["5", 0], "edit_level": 0.6, "steps": 8}}
    prompt["14"] = {"class_type": "LOCOFindDirections", "inputs": {
        **shared, "inversion": ["10", 0], "mask": ["13", 0], "rank": 3, "null_rank": 3, "max_rounds": 6,
        "tolerance": 0.01, "seed": 0, "batch_index": 0, "jvp_strategy": "auto"}}
    return prompt, shared


def apply_node(shared, strength, index=0, weights=""):
    return {"class_type": "LOCOApplyEdit", "inputs": {
        **shared, "inversion": ["10", 0], "directions": ["14", 0], "direction_index": index,
        "strength": strength, "direction_weights": weights}}


@pytest.fixture(scope="module")
def edit_run(comfy):
    prompt, shared = model_nodes()
    prompt["15"] = apply_node(shared, 3.0)
    prompt["16"] = apply_node(shared, 0.0)
    prompt["17"] = {"class_type": "LOCOSweep", "inputs": {
        **shared, "inversion": ["10", 0], "directions": ["14", 0], "direction_index": 0,
        "max_strength": 3.0, "count": 3, "batch_index": 0}}
    return comfy.run(prompt, targets=["5", "14", "15", "16", "17"])


def test_posterior_mean_equals_ksampler_denoised(comfy, tiny_lora):
    # SamplerCustom with the one-step schedule [sigma, 0] reports KSampler's
    # denoised prediction at sigma; LOCO's adapter must give the same tensor,
    # here with a LoRA patch and CFG above 1.
    prompt, _ = model_nodes(lora_name=tiny_lora)
    model = ["6", 0]
    prompt["20"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "normal", "steps": 1, "denoise": 0.6}}
    prompt["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["22"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model, "add_noise": True, "noise_seed": 7, "cfg": 3.0, "positive": ["2", 0], "negative": ["3", 0],
        "sampler": ["21", 0], "sigmas": ["20", 0], "latent_image": ["5", 0]}}
    prompt["23"] = {"class_type": "LOCOPosteriorMean", "inputs": {
        "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent": ["5", 0], "sigmas": ["20", 0],
        "noise_seed": 7, "cfg": 3.0}}

    result = comfy.run(prompt, targets=["22", "23"])

    expected = result.values("22")[1]["samples"]
    actual = result.values("23")[0]["samples"]
    assert actual.shape == expected.shape == (1, 4, 8, 8)
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-6


def test_directions_are_finite_orthonormal(edit_run):
    directions, preview, report = edit_run.values("14")

    flat = directions.vectors.reshape(directions.rank, -1).double()
    assert directions.rank == 3
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert preview.shape[0] == 1
    assert preview.shape[-1] == 3
    assert '"leakage_after"' in report
    # Forward mode and reverse mode both work through ComfyUI's UNet, with no fallback.
    assert directions.parameters["strategies"] == {"jvp": "forward", "vjp": "reverse"}


def test_symmetric_vjp_option(comfy):
    prompt, _ = model_nodes()
    prompt["14"]["inputs"]["vjp_strategy"] = "symmetric"
    directions, _, report = comfy.run(prompt, targets=["14"]).values("14")
    assert json.loads(report)["parameters"]["strategies"]["vjp"] == "symmetric"
    assert torch.isfinite(directions.vectors).all()


def test_directions_repeat_for_a_seed(comfy, edit_run):
    comfy.clear_cache()
    prompt, _ = model_nodes()
    again = comfy.run(prompt, targets=["14"]).values("14")[0]
    assert torch.equal(again.vectors, edit_run.values("14")[0].vectors)


def test_edit_changes_inside_mask_more_than_outside(edit_run):
    edited = edit_run.values("15")[0]["samples"]
    plain = edit_run.values("16")[0]["samples"]
    change = (edited - plain).pow(2).sum(dim=1)[0]

    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[LATENT_SQUARE] = True
    mean_inside = float(change[inside].mean())
    mean_outside = float(change[~inside].mean())
    assert mean_inside > 0
    assert mean_outside < 0.05 * mean_inside


def test_zero_strength_is_the_plain_decode(edit_run):
    plain = edit_run.values("16")[0]["samples"]
    sweep, strengths, grid = edit_run.values("17")
    assert strengths == "[-3.0, 0.0, 3.0]"
    # The sweep decodes three latents in one batch, which may change the
    # order of float operations against the single-latent decode.
    middle = sweep["samples"][1:2]
    assert float((middle - plain).abs().max() / plain.abs().max()) < 1e-5
    assert not torch.equal(sweep["samples"][0:1], sweep["samples"][2:3])
    assert grid.shape == (1, 1, 1, 3)


def test_user_model_unchanged_by_jacobian_passes(comfy, edit_run):
    comfy.clear_cache()
    prompt, _ = model_nodes()
    again = comfy.run(prompt, targets=["5"]).values("5")[0]["samples"]
    assert torch.equal(again, edit_run.values("5")[0]["samples"])


def test_lora_and_cfg_change_directions(comfy, tiny_lora, edit_run):
    prompt, _ = model_nodes(lora_name=tiny_lora, cfg=2.5)
    patched = comfy.run(prompt, targets=["14"]).values("14")[0]
    plain = edit_run.values("14")[0]
    assert torch.isfinite(patched.vectors).all()
    assert patched.model_fingerprint != plain.model_fingerprint
    assert not torch.allclose(patched.vectors, plain.vectors, atol=1e-3)


def test_interrupt_stops_within_one_round(comfy):
    from harness.inprocess import PromptInterruptedError

    comfy.clear_cache()
    prompt, _ = model_nodes()
    prompt["14"]["inputs"]["max_rounds"] = 50
    prompt["14"]["inputs"]["tolerance"] = 1e-8
    rounds_after_interrupt = []

    def on_event(event, data):
        if event == "progress" and data.get("node") == "14":
            if rounds_after_interrupt or data["value"] >= 1:
                rounds_after_interrupt.append(data["value"])
                comfy.interrupt()

    with pytest.raises(PromptInterruptedError):
        comfy.run(prompt, targets=["14"], on_event=on_event)
    assert 1 <= len(rounds_after_interrupt) <= 2


def test_save_and_load_directions(comfy, edit_run):
    prompt, _ = model_nodes()
    prompt["30"] = {"class_type": "LOCOSaveDirections", "inputs": {"directions": ["14", 0], "filename_prefix": "loco_test/dirs"}}
    first = comfy.run(prompt, targets=["30"]).values("30")[0]
    comfy.clear_cache()
    second = comfy.run(prompt, targets=["30"]).values("30")[0]

    assert first == "loco_test/dirs_00001.safetensors"
    assert second == "loco_test/dirs_00002.safetensors"
    loaded = comfy.run({"31": {"class_type": "LOCOLoadDirections", "inputs": {"filename": first}}}, targets=["31"]).values("31")[0]
    torch.testing.assert_close(loaded.vectors, edit_run.values("14")[0].vectors)


def test_save_rejects_path_outside_output(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = model_nodes()
    prompt["30"] = {"class_type": "LOCOSaveDirections", "inputs": {"directions": ["14", 0], "filename_prefix": "../escape/dirs"}}
    with pytest.raises(PromptExecutionError, match="outside the output folder"):
        comfy.run(prompt, targets=["30"])
    assert not (comfy.base_dir / "escape").exists()


def test_transfer_compose_and_text_direction(comfy, edit_run):
    prompt, shared = model_nodes()
    prompt["40"] = {"class_type": "KSampler", "inputs": {**prompt["5"]["inputs"], "seed": 11}}
    prompt["41"] = {"class_type": "LOCOInvert", "inputs": {**prompt["10"]["inputs"], "latent": ["40", 0]}}
    prompt["42"] = {"class_type": "LOCOTransferDirections", "inputs": {
        **shared, "directions": ["14", 0], "inversion": ["41", 0], "null_rank": 3, "seed": 0, "batch_index": 0}}
    prompt["43"] = {"class_type": "LOCOComposeDirections", "inputs": {"directions": ["14", 0], "weights": "0:1.0, 1:-0.5"}}
    prompt["45"] = {"class_type": "LOCOTestConditioning", "inputs": {"seed": 9, "tokens": 4}}
    prompt["46"] = {"class_type": "LOCOTextDirection", "inputs": {
        **shared, "edit_positive": ["45", 0], "inversion": ["10", 0], "mask": ["13", 0], "null_rank": 3, "seed": 0, "batch_index": 0}}

    result = comfy.run(prompt, targets=["42", "43", "46"])

    source = edit_run.values("14")[0]
    moved = result.values("42")[0]
    composed = result.values("43")[0]
    text = result.values("46")[0]
    assert torch.isfinite(moved.vectors).all()
    assert moved.leakage_after.shape == (3,)
    torch.testing.assert_close(composed.vectors[0], source.vectors[0] - 0.5 * source.vectors[1])
    assert text.rank == 1
    assert float(text.vectors[0].norm()) == pytest.approx(1.0, abs=1e-4)


def test_mask_of_wrong_size_raises(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = model_nodes()
    prompt["11"]["inputs"].update(width=50, height=50)
    with pytest.raises(PromptExecutionError, match="MASK is 50x50 but the latent is 8x8"):
        comfy.run(prompt, targets=["14"])


def test_mask_policy_accepts_every_rank(comfy):
    # ComfyUI registers a custom node package under its folder path.
    (masks,) = [module for name, module in sys.modules.items() if name.endswith("ComfyUI-LOCO.nodes.loco_masks")]
    square = torch.zeros(64, 64)
    square[16:48, 16:48] = 1
    expected = masks.mask_to_latent(square, (1, 4, 8, 8))

    for variant in (square[None], square[None, None], square.bool(), (square * 255).to(torch.uint8)):
        torch.testing.assert_close(masks.mask_to_latent(variant, (1, 4, 8, 8)), expected)
    assert expected.shape == (1, 8, 8)
    assert float(expected[0, 2:6, 2:6].min()) == 1.0
    assert float(expected.sum()) == 16.0

    per_image = torch.stack([square, torch.zeros(64, 64)])
    assert float(masks.mask_to_latent(per_image, (2, 4, 8, 8), batch_index=1).sum()) == 0.0
    with pytest.raises(ValueError, match="MASK batch of 3"):
        masks.mask_to_latent(torch.zeros(3, 64, 64), (2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        masks.mask_to_latent(square * 2, (1, 4, 8, 8))


def test_invert_needs_exactly_one_source(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = model_nodes()
    del prompt["10"]["inputs"]["latent"]
    with pytest.raises(PromptExecutionError, match="nothing to invert"):
        comfy.run(prompt, targets=["10"])


def digit_nodes(comfy, digit: int, box: tuple[int, int, int, int], invert_steps: int):
    """Nodes 1-7: digit model A, the pixel-space VAE, a sample digit, a mask box and its inversion.

    ``box`` is (x, y, width, height) of the white region in the 32x32 mask.
    """
    import shutil

    from harness.locate import PACK_ROOT

    image_name = f"loco_digit_{digit}.png"
    shutil.copy(PACK_ROOT / "assets" / "samples" / f"digit_{digit}.png", comfy.input_dir / image_name)
    x, y, width, height = box
    prompt = {
        "1": {"class_type": "LOCOLoadDiffusionModel", "inputs": {"model_name": "pack/loco_digits_a.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width, "height": height}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["4", 0], "source": ["5", 0], "x": x, "y": y, "operation": "add"}},
    }
    shared = {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "cfg": 1.0}
    prompt["7"] = {"class_type": "LOCOInvert", "inputs": {
        **shared, "image": ["3", 0], "vae": ["2", 0], "edit_level": 0.4, "steps": invert_steps}}
    return prompt, shared


def test_edit_digit_image_on_embedded_model(comfy):
    # A real image through the pixel-space VAE: LoadImage -> LOCO Invert
    # (image + vae) -> directions in the upper half -> sweep decoded to a grid.
    prompt, shared = digit_nodes(comfy, digit=3, box=(0, 0, 32, 16), invert_steps=20)
    prompt["8"] = {"class_type": "LOCOFindDirections", "inputs": {
        **shared, "inversion": ["7", 0], "mask": ["6", 0], "rank": 3, "null_rank": 3, "max_rounds": 8,
        "tolerance": 0.01, "seed": 0, "batch_index": 0, "jvp_strategy": "auto"}}
    prompt["9"] = {"class_type": "LOCOSweep", "inputs": {
        **shared, "inversion": ["7", 0], "directions": ["8", 0], "direction_index": 0, "max_strength": 8.0,
        "count": 3, "batch_index": 0, "vae": ["2", 0]}}

    result = comfy.run(prompt, targets=["9"])
    latent, _, grid = result.values("9")

    assert grid.shape == (1, 32, 96, 3)
    assert torch.isfinite(grid).all()
    # Decoding from edit level 0.4 spreads some change outside the mask. With
    # these few rounds the upper half changed 4.4 times more than the lower
    # half. At level 0.6 model A ties the two halves together (ratio 1.4).
    change = (latent["samples"][2] - latent["samples"][0]).pow(2).sum(dim=0)
    assert float(change[:16].mean()) > 2 * float(change[16:].mean())


def test_bad_weights_rejected_before_running(comfy):
    from harness.inprocess import PromptValidationError

    comfy.clear_cache()
    prompt, shared = model_nodes()
    prompt["15"] = apply_node(shared, 3.0, weights="0:abc, 1:1")
    events = []
    with pytest.raises(PromptValidationError, match="0:abc"):
        comfy.run(prompt, targets=["15"], on_event=lambda event, data: events.append(event))
    assert "executing" not in events
