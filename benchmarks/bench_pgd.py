"""PGD iterations per second: loco_core's dual-budget PGD next to torchattacks' PGD.

Both attack the same classifier (the shipped DigitCNN, or a freshly
initialised one when the weights are missing) on the same batch of
held-out digits with the same number of L-inf steps. The dual attack
enforces two budgets (foreground 2/255, background 0.1 on a salience mask);
torchattacks enforces one (8/255). Each side runs once to warm up, then
``--repeats`` times. Iterations per second are ``--steps`` divided by the
median wall time of a whole attack call. The results go into
docs/benchmarks/pgd.md.

torchattacks is a development-only dependency (pip install torchattacks);
it is not needed by the pack.

    .venv/bin/python benchmarks/bench_pgd.py --threads 1
"""

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loco_core import digits  # noqa: E402
from loco_core.classifiers import load_classifier  # noqa: E402
from loco_core.digit_cnn import DigitCNN  # noqa: E402
from loco_core.dual_pgd import DualPGDConfig, dual_pgd_attack  # noqa: E402
from loco_core.salience import mask_from_salience, spectral_residual_salience  # noqa: E402

SHIPPED_WEIGHTS = REPO_ROOT / "assets" / "models" / "digit_cnn.safetensors"
RESULTS_PAGE = REPO_ROOT / "docs" / "benchmarks" / "pgd.md"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images per attack call")
    parser.add_argument("--steps", type=int, default=20, help="PGD iterations per attack call")
    parser.add_argument("--repeats", type=int, default=5, help="timed attack calls per method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--output", type=Path, default=RESULTS_PAGE, help="markdown page for the results")
    return parser.parse_args()


def load_model(device: str) -> tuple[torch.nn.Module, str]:
    if SHIPPED_WEIGHTS.is_file():
        return load_classifier(SHIPPED_WEIGHTS, "digit_cnn", device=device).network, "shipped digit_cnn"
    torch.manual_seed(0)
    return DigitCNN().to(device).eval(), "DigitCNN, random weights (shipped weights missing)"


def timed(run) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(runners: dict, repeats: int) -> dict[str, list[float]]:
    """Time each runner ``repeats`` times after one warm-up call, interleaving the runners to share drift."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(timed(run))
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import torchattacks

    model, model_name = load_model(args.device)
    model.requires_grad_(False)
    images, labels = digits.load_digits("heldout")
    images, labels = images[: args.batch].to(args.device), labels[: args.batch].to(args.device)
    masks = mask_from_salience(spectral_residual_salience(images), top_fraction=0.3)

    def dual_runner(steps: int):
        config = DualPGDConfig(2 / 255, 0.1, norm="linf", steps=steps, seed=0)
        return lambda: dual_pgd_attack(model, images, masks, config, labels=labels)

    def reference_runner(steps: int, batch: torch.Tensor = images):
        attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
        return lambda: attack(batch, labels)

    # The dual attack works in channels-last layout internally; torchattacks
    # keeps the caller's layout, so it is also timed on a channels-last copy.
    images_channels_last = images.contiguous(memory_format=torch.channels_last)

    # Whole calls of `steps` iterations, and calls of twice as many: the
    # difference is the marginal cost of `steps` iterations without the
    # per-call work (the dual attack's report, torchattacks' input checks).
    long_steps = 2 * args.steps
    times = measure({
        "dual": dual_runner(args.steps),
        "reference": reference_runner(args.steps),
        "dual_long": dual_runner(long_steps),
        "reference_long": reference_runner(long_steps),
        "reference_cl": reference_runner(args.steps, images_channels_last),
        "reference_cl_long": reference_runner(long_steps, images_channels_last),
    }, args.repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    dual_rate = args.steps / median["dual"]
    reference_rate = args.steps / median["reference"]
    dual_marginal = args.steps / (median["dual_long"] - median["dual"])
    reference_marginal = args.steps / (median["reference_long"] - median["reference"])
    cl_rate = args.steps / median["reference_cl"]
    cl_marginal = args.steps / (median["reference_cl_long"] - median["reference_cl"])

    command = "python benchmarks/bench_pgd.py " + " ".join(sys.argv[1:])
    lines = [
        "# PGD iterations per second",
        "",
        "`loco_core.dual_pgd.dual_pgd_attack` (two budgets on a salience mask) next to `torchattacks.PGD` "
        f"(one budget) on the same model and batch. Whole call: {args.steps} steps divided by the median wall "
        f"time of {args.repeats} attack calls (after one warm-up call), which for the dual attack includes its "
        "report (clean and adversarial predictions, salience shares). Marginal: the extra time of a "
        f"{2 * args.steps}-step call over a {args.steps}-step call, per step; it leaves out per-call work. "
        "The calls of all methods are interleaved. Ratios are against torchattacks on the contiguous batch "
        "(the layout ComfyUI and most callers pass); the dual attack converts to channels-last internally, "
        "and the last row shows torchattacks given a channels-last batch.",
        "",
        "| method | budget (L-inf, 0..1 units) | iterations/s, whole call | ratio | iterations/s, marginal | ratio |",
        "|---|---|---|---|---|---|",
        f"| loco_core dual PGD | eps_F 2/255, eps_B 0.1 | {dual_rate:.2f} | {dual_rate / reference_rate:.2f}x | "
        f"{dual_marginal:.2f} | {dual_marginal / reference_marginal:.2f}x |",
        f"| torchattacks {torchattacks.__version__} PGD | eps 8/255 | {reference_rate:.2f} | 1.00x | "
        f"{reference_marginal:.2f} | 1.00x |",
        f"| torchattacks PGD, channels-last input | eps 8/255 | {cl_rate:.2f} | {cl_rate / reference_rate:.2f}x | "
        f"{cl_marginal:.2f} | {cl_marginal / reference_marginal:.2f}x |",
        "",
        f"- Model: {model_name}; batch {args.batch} held-out digits, 32x32 RGB; {args.steps} steps.",
        f"- Command: `{command.strip()}`",
        f"- Machine: {cpu_model()}, nproc {_nproc()}, {torch.get_num_threads()} torch thread(s), device "
        f"{args.device}; torch {torch.__version__}, Python {platform.python_version()}.",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "NOTE: other processes shared the machine's cores during the run, so absolute rates vary between runs; "
        "both methods ran back to back in one process.",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[4:9]))


def _nproc() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
