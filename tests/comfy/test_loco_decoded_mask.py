"""LOCO with the mask on the decoded image: the Jacobian of decode(D(x)) through ComfyUI's executor.

The graph of test_loco_nodes (tiny SD1.5 UNet, a 64x64 image latent, a
32x32 pixel square as the mask) with a tiny SD-architecture VAE built by
ComfyUI's own VAE class, so the mask stays at pixel resolution.
"""

import json

import pytest
import torch

from test_loco_nodes import apply_node, digit_nodes, model_nodes

PIXEL_SQUARE = (slice(16, 48), slice(16, 48))


def decoded_nodes():
    prompt, shared = model_nodes()
    prompt["30"] = {"class_type": "LOCOTestTinyVAE", "inputs": {"seed": 5}}
    prompt["14"]["inputs"].update(mask_space="decoded image", vae=["30", 0])
    return prompt, shared


@pytest.fixture(scope="module")
def decoded_run(comfy):
    prompt, shared = decoded_nodes()
    prompt["15"] = apply_node(shared, 3.0)
    prompt["16"] = apply_node(shared, 0.0)
    prompt["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["30", 0]}}
    prompt["18"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["30", 0]}}
    return comfy.run(prompt, targets=["14", "17", "18"])


def test_decoded_directions_are_orthonormal(decoded_run):
    directions, _, report = decoded_run.values("14")

    flat = directions.vectors.reshape(directions.rank, -1).double()
    assert directions.shape == (4, 8, 8)
    assert directions.mask.shape == (3, 64, 64)
    assert directions.parameters["mask_space"] == "decoded image"
    torch.testing.assert_close(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    # Forward and reverse mode both run through the UNet and the VAE decoder.
    assert json.loads(report)["parameters"]["strategies"] == {"jvp": "forward", "vjp": "reverse"}


def test_decoded_projection_cuts_leakage(decoded_run):
    directions = decoded_run.values("14")[0]
    assert float(directions.leakage_after.max()) < float(directions.leakage_before.max())


def test_decoded_edit_stays_in_the_pixel_square(decoded_run):
    edited = decoded_run.values("17")[0]
    plain = decoded_run.values("18")[0]
    change = (edited - plain).pow(2).sum(dim=-1)[0]

    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[PIXEL_SQUARE] = True
    mean_inside = float(change[inside].mean())
    mean_outside = float(change[~inside].mean())
    assert mean_inside > 0
    assert mean_outside < 0.2 * mean_inside


def test_decoded_directions_differ_from_latent_ones(comfy, decoded_run):
    prompt, _ = model_nodes()
    latent_directions = comfy.run(prompt, targets=["14"]).values("14")[0]
    decoded_directions = decoded_run.values("14")[0]
    assert not torch.allclose(latent_directions.vectors, decoded_directions.vectors, atol=1e-3)


def test_transfer_keeps_the_decoded_mask_space(comfy, decoded_run):
    prompt, shared = decoded_nodes()
    prompt["40"] = {"class_type": "KSampler", "inputs": {**prompt["5"]["inputs"], "seed": 11}}
    prompt["41"] = {"class_type": "LOCOInvert", "inputs": {**prompt["10"]["inputs"], "latent": ["40", 0]}}
    prompt["42"] = {"class_type": "LOCOTransferDirections", "inputs": {
        **shared, "directions": ["14", 0], "inversion": ["41", 0], "null_rank": 3, "seed": 0, "batch_index": 0,
        "vae": ["30", 0], "max_rounds": 4}}

    moved = comfy.run(prompt, targets=["42"]).values("42")[0]

    assert moved.parameters["mask_space"] == "decoded image"
    assert moved.parameters["transferred"]["max_rounds"] == 4
    assert moved.mask.shape == (3, 64, 64)
    assert torch.isfinite(moved.vectors).all()
    assert moved.leakage_after.shape == (3,)


def test_text_direction_on_the_decoded_image(comfy):
    prompt, shared = decoded_nodes()
    prompt["45"] = {"class_type": "LOCOTestConditioning", "inputs": {"seed": 9, "tokens": 4}}
    prompt["46"] = {"class_type": "LOCOTextDirection", "inputs": {
        **shared, "edit_positive": ["45", 0], "inversion": ["10", 0], "mask": ["13", 0], "null_rank": 2, "seed": 0,
        "batch_index": 0, "mask_space": "decoded image", "vae": ["30", 0]}}

    text = comfy.run(prompt, targets=["46"]).values("46")[0]

    assert text.parameters["mask_space"] == "decoded image"
    assert float(text.vectors[0].norm()) == pytest.approx(1.0, abs=1e-4)
    assert bool(torch.isfinite(text.leakage_after).all())


def test_decoded_mask_space_needs_a_vae(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = decoded_nodes()
    del prompt["14"]["inputs"]["vae"]
    with pytest.raises(PromptExecutionError, match="no vae is connected"):
        comfy.run(prompt, targets=["14"])


def test_decoded_rejects_latent_sized_mask(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = decoded_nodes()
    prompt["11"]["inputs"].update(width=8, height=8)
    prompt["14"]["inputs"]["mask"] = ["11", 0]
    with pytest.raises(PromptExecutionError, match="MASK is 8x8 but the decoded image is 64x64"):
        comfy.run(prompt, targets=["14"])


def test_decoded_rejects_foreign_vae(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = decoded_nodes()
    prompt["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    with pytest.raises(PromptExecutionError, match="the vae decodes latents of 3 channels but the model's latent has 4"):
        comfy.run(prompt, targets=["14"])


def test_identity_decoder_gives_latent_directions(comfy):
    # The pixel-space VAE decodes a latent to itself, so on a pixel-space
    # model both mask spaces take the same Jacobian and must agree.
    prompt, shared = digit_nodes(comfy, digit=5, box=(8, 8, 16, 16), invert_steps=10)
    find = {**shared, "inversion": ["7", 0], "mask": ["6", 0], "rank": 2, "null_rank": 2, "max_rounds": 4,
            "tolerance": 1e-3, "seed": 0, "batch_index": 0, "jvp_strategy": "auto"}
    prompt["8"] = {"class_type": "LOCOFindDirections", "inputs": find}
    prompt["9"] = {"class_type": "LOCOFindDirections", "inputs": {**find, "mask_space": "decoded image", "vae": ["2", 0]}}

    result = comfy.run(prompt, targets=["8", "9"])

    latent_directions = result.values("8")[0]
    decoded_directions = result.values("9")[0]
    assert decoded_directions.parameters["mask_space"] == "decoded image"
    torch.testing.assert_close(decoded_directions.singular_values, latent_directions.singular_values, rtol=1e-4, atol=0)
    torch.testing.assert_close(decoded_directions.vectors, latent_directions.vectors, rtol=0, atol=1e-4)


def test_unknown_mask_space_rejected(comfy):
    from harness.inprocess import PromptExecutionError, PromptValidationError

    prompt, _ = decoded_nodes()
    prompt["14"]["inputs"]["mask_space"] = "pixels"
    with pytest.raises((PromptExecutionError, PromptValidationError), match="pixels"):
        comfy.run(prompt, targets=["14"])


def test_null_rank_too_high_rejected(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, _ = decoded_nodes()
    # A full mask minus one pixel leaves 3 entries (three channels) outside.
    prompt["11"]["inputs"]["value"] = 1.0
    prompt["12"]["inputs"].update(value=0.0, width=1, height=1)
    prompt["13"]["inputs"]["operation"] = "multiply"
    prompt["14"]["inputs"]["null_rank"] = 5
    with pytest.raises(PromptExecutionError, match="null_rank=5 exceeds the dimension 3 of the region outside the mask"):
        comfy.run(prompt, targets=["14"])


def test_invert_rejects_foreign_vae(comfy):
    from harness.inprocess import PromptExecutionError

    prompt, shared = model_nodes()
    prompt["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    prompt["31"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}}
    prompt["10"]["inputs"] = {**shared, "image": ["31", 0], "vae": ["30", 0], "edit_level": 0.6, "steps": 8}
    with pytest.raises(PromptExecutionError, match="the vae encodes 3 channels but the model works on 4"):
        comfy.run(prompt, targets=["10"])
