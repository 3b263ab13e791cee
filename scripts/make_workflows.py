"""Write the shipped workflows (workflows/*.json) from the live node schemas.

Starts ComfyUI in process with this pack (harness.inprocess), reads every
node's schema the way /object_info reports it, and builds each workflow with
harness.workflow_builder, so widget order, control values and sockets match
what the frontend saves. A workflow whose node types are not all registered
is skipped with a warning. Run after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python scripts/make_workflows.py

Each file records in ``extra.comfyui_loco`` whether it runs on the pack's
embedded models (scripts/main_job.py runs those) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

PACK_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: the pack's nodes/ package must not shadow ComfyUI's nodes.py.
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))

from harness.workflow_builder import WorkflowBuilder  # noqa: E402

logger = logging.getLogger("make_workflows")

WORKFLOW_DIR = PACK_ROOT / "workflows"
DIGIT_CLASSIFIER = "pack/digit_cnn.safetensors"
DIGIT_MODEL_A = "pack/loco_digits_a.safetensors"
DIGIT_MODEL_B = "pack/loco_digits_b.safetensors"

# Output slots by index: ComfyUI 0.3.64's /object_info names V3 outputs by
# display name or type, not by id, so several outputs can share a name.
LOADER_MODEL, LOADER_CONDITIONING = 0, 1
CHECKPOINT_MODEL, CHECKPOINT_CLIP, CHECKPOINT_VAE = 0, 1, 2
FIND_DIRECTIONS, FIND_PREVIEW, FIND_REPORT = 0, 1, 2

# Small settings for the embedded 32x32 models so the main job stays at a
# few minutes on a CPU; raise them in the editor for better directions.
# With model A at edit level 0.4, 20 DDIM steps reconstruct digit_3.png at
# strength 0 with a pixel MSE of 0.0005.
EDIT_STEPS = 20
FIND_ROUNDS = 3

# Model A ties the top of a digit strongly to the rest, so at edit level 0.6
# an edit of the top half changed the lower half about as much. At 0.4 the
# change stays in the masked region (see model A's card).
DIGIT_EDIT_LEVEL = 0.4
MASK_FOREGROUND = 0
ATTACK_ADVERSARIAL, ATTACK_PERTURBATION, ATTACK_REPORT, ATTACK_SUMMARY = 0, 1, 2, 3
SEED_NOISE = 0
COMPARE_GRID, COMPARE_HEATMAP, COMPARE_HISTOGRAM, COMPARE_SAMPLES, COMPARE_REPORT, COMPARE_SUMMARY = range(6)


def dual_perturbation_attack(info: dict) -> WorkflowBuilder:
    """Dual-budget PGD on a digit: small foreground budget, large background budget."""
    b = WorkflowBuilder(info)
    b.note(
        "# Dual-perturbation attack\n"
        "A salience map splits the digit into foreground and background. PGD then perturbs the "
        "foreground by at most 2/255 and the background by at most 16/255 (L-inf) until the "
        "pack's digit classifier changes its answer.\n\n"
        "Reports: clean prediction, adversarial prediction, success and per-region norms.",
        column=0,
    )
    image = b.add("LoadImage", {"image": "digit_3.png"}, column=0)
    classifier = b.add("LOCOLoadClassifier", {"weights": DIGIT_CLASSIFIER, "architecture": "digit_cnn"}, column=0)
    mask = b.add("LOCOSalienceMask", {"rule": "top_fraction", "top_fraction": 0.3, "work_size": 32}, column=1)
    clean = b.add("LOCOClassifyImage", title="Clean prediction", column=1)
    attack = b.add("LOCODualPGDAttack", {"norm": "linf", "eps_foreground": 0.0078, "eps_background": 0.0627,
                                         "steps": 20, "restarts": 1, "seed": 0}, column=2)
    mask_image = b.add("MaskToImage", column=1)
    save_adversarial = b.add("SaveImage", {"filename_prefix": "loco_attack/adversarial"}, column=3)
    save_perturbation = b.add("SaveImage", {"filename_prefix": "loco_attack/perturbation"}, column=3)
    save_mask = b.add("SaveImage", {"filename_prefix": "loco_attack/foreground"}, column=3)
    show_clean = b.add("PreviewAny", title="Clean prediction (JSON)", column=2)
    show_summary = b.add("PreviewAny", title="Attack summary", column=3)

    b.connect(image, "IMAGE", mask, "image")
    b.connect(image, "IMAGE", clean, "image")
    b.connect(classifier, 0, clean, "classifier")
    b.connect(clean, 0, show_clean, "source")
    b.connect(classifier, 0, attack, "classifier")
    b.connect(image, "IMAGE", attack, "image")
    b.connect(mask, MASK_FOREGROUND, attack, "foreground")
    b.connect(mask, MASK_FOREGROUND, mask_image, "mask")
    b.connect(mask_image, 0, save_mask, "images")
    b.connect(attack, ATTACK_ADVERSARIAL, save_adversarial, "images")
    b.connect(attack, ATTACK_PERTURBATION, save_perturbation, "images")
    b.connect(attack, ATTACK_SUMMARY, show_summary, "source")
    b.group("Attack", [attack, save_adversarial, save_perturbation, show_summary])
    return b


def reproducibility_comparison(info: dict) -> WorkflowBuilder:
    """Two embedded digit models sampled from identical seed noise and compared."""
    b = WorkflowBuilder(info)
    b.note(
        "# Cross-model reproducibility\n"
        "Models A and B were trained on the same digits with different seeds. Both start from the "
        "same noise for every seed and use the same deterministic sampler; the comparison reports "
        "the per-seed similarity, a threshold calibrated on mismatched-seed pairs and the "
        "reproducibility score RP (the share of seeds above it).",
        column=0,
    )
    vae = b.add("VAELoader", {"vae_name": "pixel_space"}, column=0)
    model_a = b.add("LOCOLoadDiffusionModel", {"model_name": DIGIT_MODEL_A}, title="Model A", column=0)
    model_b = b.add("LOCOLoadDiffusionModel", {"model_name": DIGIT_MODEL_B}, title="Model B", column=0)
    entry_a = b.add("LOCOComparisonModel", {"label": "A"}, column=1)
    entry_b = b.add("LOCOComparisonModel", {"label": "B"}, column=2)
    noise = b.add("LOCOSeedNoise", {"start_seed": 0, "count": 8, "latent_channels": 3, "latent_height": 32,
                                    "latent_width": 32}, column=2)
    compare = b.add("LOCOCompareModels", {"sampler_name": "euler", "scheduler": "normal", "steps": 10,
                                          "cfg": 1.0, "batch_size": 8, "metric": "ssim"}, column=3)
    save_grid = b.add("SaveImage", {"filename_prefix": "loco_reproducibility/paired_grid"}, column=4)
    save_histogram = b.add("SaveImage", {"filename_prefix": "loco_reproducibility/histogram"}, column=4)
    show_summary = b.add("PreviewAny", title="Reproducibility summary", column=4)

    b.connect(model_a, LOADER_MODEL, entry_a, "model")
    b.connect(vae, 0, entry_a, "vae")
    b.connect(model_b, LOADER_MODEL, entry_b, "model")
    b.connect(vae, 0, entry_b, "vae")
    b.connect(entry_a, 0, entry_b, "previous_models")
    b.connect(entry_b, 0, compare, "models")
    b.connect(noise, SEED_NOISE, compare, "noise")
    b.connect(compare, COMPARE_GRID, save_grid, "images")
    b.connect(compare, COMPARE_HISTOGRAM, save_histogram, "images")
    b.connect(compare, COMPARE_SUMMARY, show_summary, "source")
    return b


def _box_mask(b: WorkflowBuilder, size: int, box: tuple[int, int, int, int], column: int):
    """Build a 0/1 MASK of ``size`` x ``size`` with a white box (x, y, width, height) from core nodes."""
    x, y, width, height = box
    base = b.add("SolidMask", {"value": 0.0, "width": size, "height": size}, title="Mask canvas", column=column)
    white = b.add("SolidMask", {"value": 1.0, "width": width, "height": height}, title="Edit region", column=column)
    mask = b.add("MaskComposite", {"x": x, "y": y, "operation": "add"}, title="Region mask", column=column + 1)
    b.connect(base, 0, mask, "destination")
    b.connect(white, 0, mask, "source")
    return mask


def _digit_model(b: WorkflowBuilder, model_name: str = DIGIT_MODEL_A, title: str = "Digit model A"):
    model = b.add("LOCOLoadDiffusionModel", {"model_name": model_name, "weight_dtype": "fp32"}, title=title, column=0)
    vae = b.add("VAELoader", {"vae_name": "pixel_space"}, column=0)
    return model, vae


def _encode_image(b: WorkflowBuilder, vae, image_name: str, title: str, column: int = 0):
    image = b.add("LoadImage", {"image": image_name}, title=title, column=column)
    latent = b.add("VAEEncode", column=column + 1)
    b.connect(image, "IMAGE", latent, "pixels")
    b.connect(vae, 0, latent, "vae")
    return latent


def _invert(b: WorkflowBuilder, model, latent, column: int = 2):
    inversion = b.add("LOCOInvert", {"edit_level": DIGIT_EDIT_LEVEL, "steps": EDIT_STEPS, "cfg": 1.0}, column=column)
    b.connect(model, LOADER_MODEL, inversion, "model")
    b.connect(model, LOADER_CONDITIONING, inversion, "positive")
    b.connect(model, LOADER_CONDITIONING, inversion, "negative")
    b.connect(latent, 0, inversion, "latent")
    return inversion


def _edit_node(b: WorkflowBuilder, node_type: str, widgets: dict, model, inversion, directions, column: int,
               title: str | None = None):
    node = b.add(node_type, widgets, title=title, column=column)
    b.connect(model, LOADER_MODEL, node, "model")
    b.connect(model, LOADER_CONDITIONING, node, "positive")
    b.connect(model, LOADER_CONDITIONING, node, "negative")
    b.connect(inversion, 0, node, "inversion")
    b.connect(directions, 0, node, "directions")
    return node


def _decode_and_save(b: WorkflowBuilder, latent_node, vae, prefix: str, column: int, title: str | None = None):
    decode = b.add("VAEDecode", column=column)
    save = b.add("SaveImage", {"filename_prefix": prefix}, title=title, column=column + 1)
    b.connect(latent_node, 0, decode, "samples")
    b.connect(vae, 0, decode, "vae")
    b.connect(decode, 0, save, "images")
    return save


def loco_edit_real_image(info: dict) -> WorkflowBuilder:
    """LOCO Edit of a real digit image: invert, find directions in a region, sweep, apply."""
    b = WorkflowBuilder(info)
    b.note(
        "# LOCO Edit of a real image\n"
        f"The digit is carried up to noise level {DIGIT_EDIT_LEVEL} with deterministic DDIM. The top singular "
        "vectors of the denoiser's Jacobian, restricted to the white box of the mask and with the "
        "rest of the image's directions projected out, are the edit directions. The sweep shows "
        "direction 0 from -6 to +6 (its sign is arbitrary); Apply Edit decodes one strength.",
        column=0,
    )
    model, vae = _digit_model(b)
    latent = _encode_image(b, vae, "digit_3.png", "Image to edit")
    inversion = _invert(b, model, latent)
    mask = _box_mask(b, 32, (8, 4, 16, 12), column=1)
    find = b.add("LOCOFindDirections", {"rank": 2, "null_rank": 3, "max_rounds": FIND_ROUNDS, "seed": 0}, column=3)
    b.connect(model, LOADER_MODEL, find, "model")
    b.connect(model, LOADER_CONDITIONING, find, "positive")
    b.connect(model, LOADER_CONDITIONING, find, "negative")
    b.connect(inversion, 0, find, "inversion")
    b.connect(mask, 0, find, "mask")

    sweep = _edit_node(b, "LOCOSweep", {"direction_index": 0, "max_strength": 6.0, "count": 3},
                       model, inversion, find, column=4)
    apply = _edit_node(b, "LOCOApplyEdit", {"direction_index": 0, "strength": 4.0},
                       model, inversion, find, column=4)
    _decode_and_save(b, sweep, vae, "loco_edit/sweep", column=5, title="Sweep of direction 0")
    _decode_and_save(b, apply, vae, "loco_edit/edited", column=5, title="Edited image")
    save_preview = b.add("SaveImage", {"filename_prefix": "loco_edit/directions"}, title="Directions", column=4)
    report = b.add("PreviewAny", title="Directions report", column=4)
    b.connect(find, FIND_PREVIEW, save_preview, "images")
    b.connect(find, FIND_REPORT, report, "source")
    return b


def loco_transfer_compose(info: dict) -> WorkflowBuilder:
    """Directions found on one digit, transferred to another and composed."""
    b = WorkflowBuilder(info)
    b.note(
        "# Transfer and composition\n"
        "Directions found on digit 3 are re-projected onto digit 5's own complement subspace "
        "(LOCO Transfer Directions) and applied there. LOCO Compose Directions adds directions 0 "
        "and 1 of the source set into one edit.",
        column=0,
    )
    model, vae = _digit_model(b)
    source_latent = _encode_image(b, vae, "digit_3.png", "Source image")
    target_latent = _encode_image(b, vae, "digit_5.png", "Target image")
    source = _invert(b, model, source_latent)
    target = _invert(b, model, target_latent)
    mask = _box_mask(b, 32, (8, 4, 16, 12), column=1)
    find = b.add("LOCOFindDirections", {"rank": 2, "null_rank": 3, "max_rounds": FIND_ROUNDS, "seed": 0}, column=3)
    b.connect(model, LOADER_MODEL, find, "model")
    b.connect(model, LOADER_CONDITIONING, find, "positive")
    b.connect(model, LOADER_CONDITIONING, find, "negative")
    b.connect(source, 0, find, "inversion")
    b.connect(mask, 0, find, "mask")

    transfer = b.add("LOCOTransferDirections", {"null_rank": 3, "seed": 0}, column=4)
    b.connect(model, LOADER_MODEL, transfer, "model")
    b.connect(model, LOADER_CONDITIONING, transfer, "positive")
    b.connect(model, LOADER_CONDITIONING, transfer, "negative")
    b.connect(find, 0, transfer, "directions")
    b.connect(target, 0, transfer, "inversion")
    compose = b.add("LOCOComposeDirections", {"weights": "0:1.0, 1:1.0"}, column=4)
    b.connect(find, 0, compose, "directions")

    on_target = _edit_node(b, "LOCOSweep", {"direction_index": 0, "max_strength": 6.0, "count": 3},
                           model, target, transfer, column=5, title="Transferred sweep")
    composed = _edit_node(b, "LOCOApplyEdit", {"direction_index": 0, "strength": 4.0},
                          model, source, compose, column=5, title="Composed edit")
    _decode_and_save(b, on_target, vae, "loco_transfer/transferred_sweep", column=6, title="Transferred sweep")
    _decode_and_save(b, composed, vae, "loco_transfer/composed", column=6, title="Composed edit")
    return b


def tloco_stable_diffusion(info: dict) -> WorkflowBuilder:
    """T-LOCO on a Stable Diffusion 1.5 checkpoint: an edit direction from an edit prompt."""
    b = WorkflowBuilder(info)
    b.note(
        "# T-LOCO with Stable Diffusion 1.5\n"
        "Files to provide:\n"
        "- **models/checkpoints/v1-5-pruned-emaonly.safetensors**: a Stable Diffusion 1.5 checkpoint "
        "(any SD1.5 checkpoint works; pick it in Load Checkpoint).\n"
        "- **input/face.png**: the image to edit, 512x512 (Load Image scales it).\n\n"
        "The mask's white box marks the region to edit in latent pixels (64x64 for 512x512 images). "
        "The source prompt describes the image; the edit prompt describes the change. The "
        "direction is applied with the source conditioning. Runs for minutes on a CPU.",
        column=0,
    )
    checkpoint = b.add("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, column=0)
    source_prompt = b.add("CLIPTextEncode", {"text": "a photo of a face"}, title="Source prompt", column=1)
    edit_prompt = b.add("CLIPTextEncode", {"text": "a photo of a smiling face"}, title="Edit prompt", column=1)
    negative = b.add("CLIPTextEncode", {"text": ""}, title="Negative prompt", column=1)
    image = b.add("LoadImage", {"image": "face.png"}, title="Image to edit", column=0)
    scale = b.add("ImageScale", {"upscale_method": "lanczos", "width": 512, "height": 512, "crop": "center"},
                  column=1)
    latent = b.add("VAEEncode", column=2)
    inversion = b.add("LOCOInvert", {"edit_level": 0.6, "steps": 20, "cfg": 1.0}, column=3)
    mask = _box_mask(b, 64, (16, 36, 32, 16), column=1)
    direction = b.add("LOCOTextDirection", {"null_rank": 5, "seed": 0}, column=4)
    apply = b.add("LOCOApplyEdit", {"direction_index": 0, "strength": 6.0}, column=5)

    for clip_user in (source_prompt, edit_prompt, negative):
        b.connect(checkpoint, CHECKPOINT_CLIP, clip_user, "clip")
    b.connect(image, "IMAGE", scale, "image")
    b.connect(scale, 0, latent, "pixels")
    b.connect(checkpoint, CHECKPOINT_VAE, latent, "vae")
    for node in (inversion, direction, apply):
        b.connect(checkpoint, CHECKPOINT_MODEL, node, "model")
        b.connect(source_prompt, 0, node, "positive")
        b.connect(negative, 0, node, "negative")
    b.connect(latent, 0, inversion, "latent")
    b.connect(edit_prompt, 0, direction, "edit_positive")
    b.connect(inversion, 0, direction, "inversion")
    b.connect(mask, 0, direction, "mask")
    b.connect(inversion, 0, apply, "inversion")
    b.connect(direction, 0, apply, "directions")
    decode = b.add("VAEDecode", column=6)
    save = b.add("SaveImage", {"filename_prefix": "tloco/edited"}, column=7)
    b.connect(apply, 0, decode, "samples")
    b.connect(checkpoint, CHECKPOINT_VAE, decode, "vae")
    b.connect(decode, 0, save, "images")
    return b


# name: (builder, runs on the embedded models, one-line summary)
WORKFLOWS: dict[str, tuple[Callable[[dict], WorkflowBuilder], bool, str]] = {
    "loco_edit_real_image": (
        loco_edit_real_image, True,
        "LOCO Edit of a real digit image: invert, find directions in a box, sweep and apply one.",
    ),
    "loco_transfer_compose": (
        loco_transfer_compose, True,
        "Directions found on one digit transferred to another, and two directions composed.",
    ),
    "tloco_stable_diffusion": (
        tloco_stable_diffusion, False,
        "T-LOCO on a Stable Diffusion 1.5 checkpoint: an edit direction from an edit prompt.",
    ),
    "dual_perturbation_attack": (
        dual_perturbation_attack, True,
        "Dual-budget PGD attack on a digit image against the pack's digit classifier.",
    ),
    "reproducibility_comparison": (
        reproducibility_comparison, True,
        "Two embedded digit models sampled from identical seed noise; similarity, threshold and RP.",
    ),
}


def live_object_info() -> dict:
    from harness.convert import object_info_from_mappings
    from harness.inprocess import ComfySession

    session = ComfySession(include_test_nodes=False).start()
    try:
        comfy_nodes = sys.modules["nodes"]  # ComfyUI's nodes.py, imported by the session
        return object_info_from_mappings(comfy_nodes.NODE_CLASS_MAPPINGS, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    finally:
        session.close()


def build_all(info: dict, names: list[str] | None = None) -> dict[str, dict]:
    """Build the requested workflows (all by default); skip those whose nodes are missing."""
    built = {}
    for name, (build, embedded, summary) in WORKFLOWS.items():
        if names and name not in names:
            continue
        try:
            builder = build(info)
        except KeyError as error:
            logger.warning("skipped %s: %s", name, error)
            continue
        workflow = builder.build(name)
        workflow["extra"]["comfyui_loco"] = {"embedded_models": embedded, "summary": summary}
        built[name] = workflow
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows to write (default: all of {sorted(WORKFLOWS)})")
    parser.add_argument("--output", type=Path, default=WORKFLOW_DIR, help="folder to write to (default: workflows/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    unknown = set(args.names) - set(WORKFLOWS)
    if unknown:
        parser.error(f"unknown workflow names {sorted(unknown)}; choose from {sorted(WORKFLOWS)}")

    built = build_all(live_object_info(), args.names)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, workflow in built.items():
        path = args.output / f"{name}.json"
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        logger.info("wrote %s (%d nodes)", path, len(workflow["nodes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
