"""Dual-perturbation adversarial training of the digit classifier, with a robustness table.

The script starts from a clean DigitCNN: the shipped
assets/models/digit_cnn.safetensors, or one trained here when that file is
missing. It fine-tunes a copy by PGD adversarial training: each batch is
attacked with salience-mask foreground/background budgets, and the model
is trained on the adversarial images together with the clean ones. Then it measures the robust accuracy
of both models on held-out digits for a grid of budgets and writes the
table into docs/robustness.md between marker comments.

Run (CPU, about 10 minutes with the defaults):

    .venv/bin/python scripts/adversarial_training.py --threads 1

NOTE: the defaults keep the run short on a CPU (few epochs, few PGD steps);
longer training gives more robust models.
"""

import argparse
import copy
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loco_core import digits  # noqa: E402
from loco_core.classifiers import load_classifier  # noqa: E402
from loco_core.digit_cnn import LABELS, DigitCNN, DigitCNNConfig  # noqa: E402
from loco_core.dual_pgd import DualPGDConfig, dual_pgd_attack  # noqa: E402
from loco_core.salience import mask_from_salience, spectral_residual_salience  # noqa: E402

logger = logging.getLogger("adversarial_training")

SHIPPED_WEIGHTS = REPO_ROOT / "assets" / "models" / "digit_cnn.safetensors"
DOCS_PAGE = REPO_ROOT / "docs" / "robustness.md"
TABLE_START = "<!-- adversarial-training:start -->"
TABLE_END = "<!-- adversarial-training:end -->"

# Foreground share of the salience masks, as in the attack node's default.
TOP_FRACTION = 0.3

# Evaluation grid: L-inf budgets (eps_F, eps_B) in pixel units of 0..1 images.
EVAL_BUDGETS = ((2 / 255, 0.0), (2 / 255, 0.1), (2 / 255, 0.2), (2 / 255, 0.3), (8 / 255, 8 / 255))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-weights", type=Path, default=SHIPPED_WEIGHTS,
                        help="clean DigitCNN to start from; trained here when the file is missing")
    parser.add_argument("--clean-epochs", type=int, default=3, help="epochs of clean training when training a base")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of adversarial fine-tuning")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eps-foreground", type=float, default=2 / 255, help="training L-inf foreground budget (0..1 units)")
    parser.add_argument("--eps-background", type=float, default=0.2, help="training L-inf background budget (0..1 units)")
    parser.add_argument("--train-steps", type=int, default=5, help="PGD steps per training batch")
    parser.add_argument("--eval-steps", type=int, default=20, help="PGD steps in the evaluation attacks")
    parser.add_argument("--train-count", type=int, default=0, help="use only this many training digits (0: all 4,500)")
    parser.add_argument("--eval-count", type=int, default=200, help="held-out digits in the evaluation (20 per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None,
                        help="save the fine-tuned weights (safetensors) to this path; not saved without it")
    parser.add_argument("--docs", type=Path, default=DOCS_PAGE, help="page that receives the table")
    return parser.parse_args()


def foreground_masks(images: torch.Tensor) -> torch.Tensor:
    """Salience masks of a batch, computed in chunks to bound memory."""
    return torch.cat([
        mask_from_salience(spectral_residual_salience(chunk), top_fraction=TOP_FRACTION)
        for chunk in images.split(500)
    ])


def evaluation_subset(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first count / 10 held-out digits of each class and their labels."""
    images, labels = digits.load_digits("heldout")
    per_class = max(1, count // digits.NUM_CLASSES)
    keep = torch.cat([torch.nonzero(labels == label)[:per_class, 0] for label in range(digits.NUM_CLASSES)])
    return images[keep], labels[keep]


def train_epoch(model, optimizer, images, labels, masks, args, generator, attack: DualPGDConfig | None) -> float:
    """Train one pass over the data and return the mean loss.

    With ``attack``, each batch is trained on its clean images plus their dual PGD adversarial images.
    """
    order = torch.randperm(len(labels), generator=generator)
    losses = []
    for batch in order.split(args.batch_size):
        batch_images, batch_labels = images[batch], labels[batch]
        inputs, targets = batch_images, batch_labels
        if attack is not None:
            config = DualPGDConfig(**{**vars(attack), "seed": int(torch.randint(0, 2**31, (1,), generator=generator))})
            adversarial = dual_pgd_attack(model, batch_images, masks[batch], config, labels=batch_labels).adversarial
            inputs = torch.cat([batch_images, adversarial])
            targets = torch.cat([batch_labels, batch_labels])

        model.train()
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def train_clean_base(args, images, labels) -> DigitCNN:
    model = DigitCNN(DigitCNNConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.clean_epochs):
        loss = train_epoch(model, optimizer, images, labels, None, args, generator, None)
        logger.info("clean epoch %d/%d: loss %.4f", epoch + 1, args.clean_epochs, loss)
    return model.eval()


def load_base(args, images, labels) -> tuple[DigitCNN, str]:
    if args.base_weights.is_file():
        wrapper = load_classifier(args.base_weights, "digit_cnn")
        network = wrapper.network
        network.requires_grad_(True)
        return network, f"`{args.base_weights.name}` (weights loaded, not retrained)"
    logger.info("%s not found; training a clean base for %d epochs", args.base_weights, args.clean_epochs)
    return train_clean_base(args, images, labels), f"trained here ({args.clean_epochs} clean epochs)"


def robust_accuracy(model, images, labels, masks, eps_fg, eps_bg, steps) -> float:
    config = DualPGDConfig(eps_fg, eps_bg, norm="linf", steps=steps, seed=0)
    result = dual_pgd_attack(model, images, masks, config, labels=labels)
    return float((result.adversarial_prediction == labels).float().mean())


def evaluate(model, images, labels, masks, steps) -> dict:
    model.eval()
    with torch.no_grad():
        clean = float((model(images).argmax(1) == labels).float().mean())
    row = {"clean": clean}
    for eps_fg, eps_bg in EVAL_BUDGETS:
        row[(eps_fg, eps_bg)] = robust_accuracy(model, images, labels, masks, eps_fg, eps_bg, steps)
    return row


def format_budget(eps: float) -> str:
    return f"{eps:.3f} ({eps * 255:.0f}/255)"


def render_table(rows: dict[str, dict], args, base_source: str, seconds: float) -> str:
    header = ["model", "clean accuracy"] + [
        f"eps_F {eps_fg * 255:.0f}/255, eps_B {eps_bg:.3g}" for eps_fg, eps_bg in EVAL_BUDGETS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, f"{row['clean']:.3f}"] + [f"{row[budget]:.3f}" for budget in EVAL_BUDGETS]
        lines.append("| " + " | ".join(cells) + " |")

    cpu = _cpu_model()
    command = "python scripts/adversarial_training.py " + " ".join(sys.argv[1:])
    notes = [
        "",
        f"Robust accuracy = share of {args.eval_count} held-out digits (equal per class) still classified "
        f"correctly after an untargeted L-inf dual PGD attack ({args.eval_steps} steps, random start, 1 restart, "
        f"foreground = top {TOP_FRACTION:.0%} spectral residual salience). Budgets in pixel units of 0..1 images.",
        "",
        f"- Base model: {base_source}.",
        f"- Dual-adversarial model: the base fine-tuned {args.epochs} epochs on clean + dual PGD images "
        f"(eps_F {format_budget(args.eps_foreground)}, eps_B {args.eps_background:.3g}, {args.train_steps} steps), "
        f"AdamW lr {args.learning_rate}, batch {args.batch_size}, seed {args.seed}.",
        f"- Command: `{command.strip()}`",
        f"- Machine: {cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}; wall time {seconds / 60:.1f} min; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines + notes)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(page: Path, start: str, end: str, body: str, title: str) -> None:
    """Replace the text between the start and end markers of a docs page (or append the section)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Robustness of the digit classifier\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")


def save_weights(model: DigitCNN, path: Path, args) -> None:
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    metadata = {
        "digit_cnn_config": model.config.to_json(),
        "labels": json.dumps(list(LABELS)),
        "training": json.dumps({
            "script": "scripts/adversarial_training.py",
            "epochs": args.epochs,
            "eps_foreground": args.eps_foreground,
            "eps_background": args.eps_background,
            "train_steps": args.train_steps,
            "seed": args.seed,
        }),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    logger.info("wrote %s", path)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    train_images, train_labels = digits.load_digits("train")
    if args.train_count > 0:
        train_images, train_labels = train_images[: args.train_count], train_labels[: args.train_count]
    eval_images, eval_labels = evaluation_subset(args.eval_count)
    train_masks = foreground_masks(train_images)
    eval_masks = foreground_masks(eval_images)

    base, base_source = load_base(args, train_images, train_labels)
    rows = {"clean (base)": evaluate(base, eval_images, eval_labels, eval_masks, args.eval_steps)}
    logger.info("base: %s", rows["clean (base)"])

    robust = copy.deepcopy(base)
    robust.requires_grad_(True)
    optimizer = torch.optim.AdamW(robust.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed + 1)
    attack = DualPGDConfig(args.eps_foreground, args.eps_background, norm="linf", steps=args.train_steps)
    for epoch in range(args.epochs):
        loss = train_epoch(robust, optimizer, train_images, train_labels, train_masks, args, generator, attack)
        logger.info("adversarial epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, args.epochs, loss, time.time() - started)

    rows["dual-adversarial fine-tuned"] = evaluate(robust, eval_images, eval_labels, eval_masks, args.eval_steps)
    logger.info("robust: %s", rows["dual-adversarial fine-tuned"])
    if args.output is not None:
        save_weights(robust.eval(), args.output, args)

    table = render_table(rows, args, base_source, time.time() - started)
    write_section(args.docs, TABLE_START, TABLE_END, table, "Dual-perturbation adversarial training")
    logger.info("updated %s", args.docs)


if __name__ == "__main__":
    main()
