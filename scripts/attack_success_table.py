"""Success rate of the dual PGD attack node against the background budget, through a real ComfyUI.

Held-out digits (an equal number per class) are written as one multi-page
TIFF, loaded with ComfyUI's LoadImage (one batch), masked by
LOCOSalienceMask and attacked by LOCODualPGDAttack with the embedded
digit classifier, once per background budget at a fixed foreground budget.
The table goes into docs/robustness.md between marker comments.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python scripts/attack_success_table.py

tests/comfy/test_attack_nodes.py runs the same sweep and checks its shape.
"""

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loco_core import digits  # noqa: E402

logger = logging.getLogger("attack_success_table")

CLASSIFIER_NAME = "pack/digit_cnn.safetensors"
DOCS_PAGE = REPO_ROOT / "docs" / "robustness.md"
TABLE_START = "<!-- success-table:start -->"
TABLE_END = "<!-- success-table:end -->"

EPS_FOREGROUND = 2 / 255
EPS_BACKGROUNDS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)
# Salience weights (lambda) compared at one background budget.
SALIENCE_WEIGHTS = (0.0, 1.0, 3.0, 10.0, 30.0)
SALIENCE_EPS_BACKGROUND = 0.1
STEPS = 20
TOP_FRACTION = 0.3


def heldout_digits(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``per_class`` held-out digits of each class, ``[N, 3, 32, 32]``, and their labels."""
    images, labels = digits.load_digits("heldout")
    keep = torch.cat([torch.nonzero(labels == label)[:per_class, 0] for label in range(digits.NUM_CLASSES)])
    return images[keep], labels[keep]


def write_multipage_tiff(images: torch.Tensor, path: Path) -> None:
    """Save ``[N, 3, H, W]`` images in 0..1 as one lossless multi-page TIFF (LoadImage reads it as a batch)."""
    frames = [
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")
        for image in images
    ]
    frames[0].save(path, save_all=True, append_images=frames[1:], compression="raw")


def attack_prompt(image_name: str, labels: list[int], eps_background: float, eps_foreground: float = EPS_FOREGROUND,
                  steps: int = STEPS, classifier: str = CLASSIFIER_NAME, seed: int = 0,
                  salience_weight: float = 0.0) -> dict:
    """API prompt: LoadImage -> LOCOSalienceMask -> LOCODualPGDAttack (node "4") with the classifier of node "1"."""
    return {
        "1": {"class_type": "LOCOLoadClassifier",
              "inputs": {"weights": classifier, "architecture": "digit_cnn", "labels": "none (class indices)",
                         "noise_sigma": 0.0, "vote_draws": 100, "vote_seed": 0}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "3": {"class_type": "LOCOSalienceMask",
              "inputs": {"image": ["2", 0], "rule": "top_fraction", "top_fraction": TOP_FRACTION, "threshold": 0.5,
                         "blur": 0.05, "work_size": 64}},
        "4": {"class_type": "LOCODualPGDAttack",
              "inputs": {"classifier": ["1", 0], "image": ["2", 0], "foreground": ["3", 0], "norm": "linf",
                         "eps_foreground": eps_foreground, "eps_background": eps_background, "steps": steps,
                         "step_foreground": 0.0, "step_background": 0.0, "restarts": 1, "random_start": True,
                         "mode": "untargeted", "labels": ",".join(str(label) for label in labels), "target": "",
                         "eot_draws": 1, "salience_weight": salience_weight, "seed": seed, "perturbation_gain": 10.0}},
    }


def write_heldout_input(session, per_class: int) -> tuple[str, list[int]]:
    """Write the held-out digits into ComfyUI's input folder; return the file name and the labels."""
    images, labels = heldout_digits(per_class)
    image_name = f"loco_heldout_digits_{per_class}.tiff"
    write_multipage_tiff(images, Path(session.input_dir) / image_name)
    return image_name, labels.tolist()


def run_attack(session, image_name: str, labels: list[int], eps_background: float, salience_weight: float = 0.0) -> dict:
    """Run the attack node once; return one row of batch figures."""
    prompt = attack_prompt(image_name, labels, eps_background, salience_weight=salience_weight)
    report = json.loads(session.run(prompt, targets=["4"]).values("4")[2])
    records = report["images"]
    return {
        "eps_foreground": EPS_FOREGROUND,
        "eps_background": eps_background,
        "salience_weight": salience_weight,
        "images": len(records),
        "clean_accuracy": report["summary"]["clean_accuracy"],
        "success_rate": report["summary"]["success_rate"],
        "mean_background_linf": report["summary"]["mean_background_linf"],
        "background_salience_clean": float(np.mean([r["background_salience_share_clean"] for r in records])),
        "background_salience_adversarial": float(np.mean([r["background_salience_share_adversarial"] for r in records])),
    }


def run_sweep(session, per_class: int = 10, eps_backgrounds=EPS_BACKGROUNDS) -> list[dict]:
    """Run the attack node once per background budget (salience weight 0)."""
    image_name, labels = write_heldout_input(session, per_class)
    rows = []
    for eps_background in eps_backgrounds:
        rows.append(run_attack(session, image_name, labels, eps_background))
        logger.info("eps_B %.3f: success %.3f", eps_background, rows[-1]["success_rate"])
    return rows


def run_salience_sweep(session, per_class: int = 10, weights=SALIENCE_WEIGHTS) -> list[dict]:
    """Run the attack node once per salience weight at the background budget SALIENCE_EPS_BACKGROUND."""
    image_name, labels = write_heldout_input(session, per_class)
    rows = []
    for weight in weights:
        rows.append(run_attack(session, image_name, labels, SALIENCE_EPS_BACKGROUND, salience_weight=weight))
        logger.info("lambda %.1f: success %.3f", weight, rows[-1]["success_rate"])
    return rows


def _table(rows: list[dict], first_column: str) -> list[str]:
    lines = [
        f"| {first_column} | digits | clean accuracy | attack success | mean background L-inf | "
        "background salience share, clean -> adversarial |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        key = f"{row['eps_background']:.2f}" if first_column == "eps_B" else f"{row['salience_weight']:g}"
        lines.append(
            f"| {key} | {row['images']} | {row['clean_accuracy']:.3f} | {row['success_rate']:.3f} | "
            f"{row['mean_background_linf']:.3f} | {row['background_salience_clean']:.3f} -> "
            f"{row['background_salience_adversarial']:.3f} |"
        )
    return lines


def render_tables(budget_rows: list[dict], weight_rows: list[dict], command: str, seconds: float) -> str:
    lines = [f"Foreground budget eps_F = {EPS_FOREGROUND:.4f} (2/255) throughout, salience weight 0:", ""]
    lines += _table(budget_rows, "eps_B")
    lines += ["", f"Salience weight lambda at eps_B = {SALIENCE_EPS_BACKGROUND}:", ""]
    lines += _table(weight_rows, "lambda")
    lines += [
        "",
        f"Untargeted L-inf dual PGD, {STEPS} steps, random start, 1 restart, seed 0, run through ComfyUI's executor "
        f"(LoadImage -> LOCOSalienceMask top {TOP_FRACTION:.0%} -> LOCODualPGDAttack) with "
        f"`{CLASSIFIER_NAME}`. Success = prediction differs from the true label (images the classifier already "
        "gets wrong would count as successes). Background salience share = fraction of the spectral residual "
        "salience outside the foreground mask; lower is less conspicuous. Budgets in pixel units of 0..1 images.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {_cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
        f"wall time {seconds:.0f} s; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(page: Path, body: str) -> None:
    """Replace the success table between its markers (or append the section)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Robustness of the digit classifier\n"
    block = f"{TABLE_START}\n{body}\n{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        before, rest = text.split(TABLE_START, 1)
        _, after = rest.split(TABLE_END, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + f"\n\n## Attack success against the background budget\n\n{block}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=10, help="held-out digits per class (10 classes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--docs", type=Path, default=DOCS_PAGE, help="page that receives the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from harness.inprocess import ComfySession

    started = time.time()
    with ComfySession(cpu=True) as session:
        budget_rows = run_sweep(session, per_class=args.per_class)
        weight_rows = run_salience_sweep(session, per_class=args.per_class)
    command = "python scripts/attack_success_table.py " + " ".join(sys.argv[1:])
    write_section(args.docs, render_tables(budget_rows, weight_rows, command.strip(), time.time() - started))
    logger.info("updated %s", args.docs)


if __name__ == "__main__":
    main()
