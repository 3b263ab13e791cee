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
LOADER_MODEL = 0
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


# name: (builder, runs on the embedded models, one-line summary)
WORKFLOWS: dict[str, tuple[Callable[[dict], WorkflowBuilder], bool, str]] = {
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
