"""Measure how many of a digit diffusion model's samples the shipped classifier recognises.

Samples each model file through the real ComfyUI executor, once per seed,
with the graph that tests/comfy/test_embedded_models.py also uses
(LOCOLoadDiffusionModel, an empty 32x32 pixel latent, KSampler, VAEDecode
with the ``pixel_space`` VAE). For every file it reports:

- recognised: the share of samples whose top ``digit_cnn`` softmax
  probability is above the confidence bar (0.9 by default), per seed and
  over all seeds, with the count of each predicted class;
- near: the share of samples closer to a training digit than the novelty
  threshold (the 1st percentile of the held-out digits' nearest-training
  distances), that is the share that copy a training digit, with the
  median nearest-training distance.

The class counts cover all samples, recognised or not.

Usage:

    COMFYUI_PATH=/path/to/ComfyUI python scripts/evaluate_digit_model.py
    COMFYUI_PATH=/path/to/ComfyUI python scripts/evaluate_digit_model.py run/loco_digits_a.safetensors \\
        --seeds 0 1 2 3 --count 64 --sampler dpmpp_2m --scheduler karras

The files need the pack's model metadata, as scripts/train_embedded.py writes it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: the pack's nodes/ package must not shadow ComfyUI's nodes.py.
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))

from harness.locate import find_comfyui  # noqa: E402
from loco_core import digits  # noqa: E402
from loco_core.digit_cnn import load_digit_cnn  # noqa: E402

logger = logging.getLogger("evaluate_digit_model")

DEFAULT_MODEL = PACK_ROOT / "assets" / "models" / "loco_digits_a.safetensors"
CLASSIFIER = PACK_ROOT / "assets" / "models" / "digit_cnn.safetensors"


def sampling_prompt(model_name: str, count: int, seed: int, steps: int, sampler: str, scheduler: str) -> dict:
    """Build loader -> empty 32x32 latent -> KSampler -> VAEDecode(pixel_space); node "5" is the image."""
    return {
        "1": {"class_type": "LOCOLoadDiffusionModel", "inputs": {"model_name": model_name, "weight_dtype": "fp32"}},
        "2": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": count}},
        "3": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1], "latent_image": ["2", 0],
                         "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
                         "scheduler": scheduler, "denoise": 1.0}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 0]}},
    }


def evaluate(session, model_path: Path, args: argparse.Namespace, classifier: torch.nn.Module,
             train_images: torch.Tensor, novelty_threshold: float) -> None:
    """Sample one model file for every seed and log its figures."""
    # The session's own diffusion_models folder keeps the user's folders untouched.
    target = session.models_dir / "diffusion_models" / model_path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, target)

    batches = []
    for seed in args.seeds:
        prompt = sampling_prompt(model_path.name, args.count, seed, args.steps, args.sampler, args.scheduler)
        image = session.run(prompt, targets=["5"]).values("5")[0]
        batches.append(image[..., :3].movedim(-1, 1).float().cpu())
        with torch.no_grad():
            confidence = classifier(batches[-1]).softmax(dim=1).max(dim=1).values
        logger.info("%s seed %d: recognised %.3f of %d", model_path.name, seed,
                    (confidence > args.confidence).float().mean().item(), args.count)

    images = torch.cat(batches)
    with torch.no_grad():
        probabilities = classifier(images).softmax(dim=1)
    recognised = (probabilities.max(dim=1).values > args.confidence).float().mean().item()
    classes = probabilities.argmax(dim=1).bincount(minlength=10).tolist()
    distances = digits.nearest_distances(images, train_images)
    near = (distances < novelty_threshold).float().mean().item()
    logger.info("%s: %s/%s, %d steps, %d samples: recognised %.3f (confidence > %s), class counts %s. "
                "Near %.3f (threshold %.3f), median nearest distance %.2f",
                model_path.name, args.sampler, args.scheduler, args.steps, len(images), recognised,
                args.confidence, classes, near, novelty_threshold, distances.median().item())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Report the share of a digit diffusion model's samples that the shipped classifier "
                    "recognises, and the share within the novelty threshold of a training digit (copies).")
    parser.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL],
                        help="model files to evaluate (default: the shipped loco_digits_a)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="KSampler seeds (default 0 1 2 3)")
    parser.add_argument("--count", type=int, default=64, help="samples per seed (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--sampler", default="euler", help="KSampler sampler_name (default euler)")
    parser.add_argument("--scheduler", default="normal", help="KSampler scheduler (default normal)")
    parser.add_argument("--confidence", type=float, default=0.9,
                        help="softmax probability a sample must exceed to count as recognised (default 0.9)")
    args = parser.parse_args(argv)

    for name in ("count", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.confidence < 1.0:
        parser.error(f"--confidence must lie strictly between 0 and 1, got {args.confidence}")
    missing = [str(path) for path in args.models if not path.is_file()]
    if missing:
        parser.error(f"model file(s) not found: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # ComfyUI's own start-up messages would bury the figures.
    for name in ("root", "comfy", "comfy_api"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logger.setLevel(logging.INFO)

    comfy_root, reason = find_comfyui()
    if comfy_root is None:
        logger.error("evaluate_digit_model: %s", reason)
        return 2

    classifier = load_digit_cnn(CLASSIFIER)
    train_images = digits.load_digits("train")[0]
    novelty_threshold = digits.novelty_threshold()

    from harness.inprocess import ComfySession, PromptExecutionError, PromptValidationError

    failed = 0
    with ComfySession(comfyui_root=comfy_root, cpu=True) as session:
        # KSampler's per-step progress bars would also bury the figures.
        import comfy.utils

        comfy.utils.set_progress_bar_enabled(False)
        for model_path in args.models:
            try:
                evaluate(session, model_path, args, classifier, train_images, novelty_threshold)
            except (PromptExecutionError, PromptValidationError) as error:
                # One unreadable file should not hide the figures of the others.
                failed += 1
                logger.error("%s: failed: %s. Give a model file that scripts/train_embedded.py wrote, "
                             "and a --sampler and --scheduler that KSampler lists.", model_path, error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
