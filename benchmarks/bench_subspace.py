"""Denoiser evaluations and wall time to find the LOCO edit and null subspaces, against the published procedure.

Both methods look for the rank-5 edit subspace (top right singular vectors
of P J) and the rank-5 null subspace (of (I - P) J). The denoiser is the
posterior mean of a Gaussian on 3x16x16 images whose variation is split
between a masked region, its outside and directions spanning both
(loco_core.closed_form.regional_gaussian), so its Jacobian is known.
The exact subspaces come from the SVD of the masked closed-form Jacobian.
Accuracy is the sine of the largest principal angle to the exact subspace,
and the target is a sine of 0.05 or less.

- ours: loco_core.masked_subspace (block subspace iteration, sign-free
  stopping rule) with the settings printed in the report;
- published: benchmarks/published_loco.py, one product per vector and call,
  element-wise stopping test.

Both count products with a loco_core.JacobianProducts, where a JVP or a VJP
is two forward-equivalents. Besides the cost of each method's own stopping
rule the report gives the forward-equivalents at which each iterate first
reached the target, computed in untimed runs. That oracle view favours the
published procedure, whose stopping rule runs long past that point.

A small conv/attention network then times both methods for the rounds they
used on the closed-form problem, for a wall-time ratio on a real network.
Its spectrum is too flat for either method to converge, so it gives timings,
not accuracy.

Usage:

    python benchmarks/bench_subspace.py --seeds 5 --repeats 3
"""

import argparse
import datetime
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from loco_core import JacobianProducts, masked_subspace, principal_angle_sine
from loco_core.closed_form import regional_gaussian
from published_loco import PUBLISHED_ATOL, PUBLISHED_MIN_ITER, RoundObserver, published_subspace

logger = logging.getLogger("bench_subspace")

SHAPE = (3, 16, 16)
SIGMA = 1.0
RANK = 5
NULL_RANK = 5
TARGET_SINE = 0.05
SWEEP_TOLERANCES = (0.1, 0.05, 0.02, 0.01, 0.001)

# Settings of ours: the loco_core defaults except the tolerance. Stopping
# once successive Ritz subspaces differ by a sine of 0.05 or less leaves the
# iterate inside the 0.05 target on these problems. The report prints the
# final sines and a sweep over other tolerances.
OVERSAMPLE = 4
TOLERANCE = 0.05
MAX_ROUNDS = 20

SUBSPACES = ("edit", "null")


@dataclass
class Problem:
    """One image x of a denoiser, the mask weights [*SHAPE] and the exact subspaces as [n, r] columns."""

    denoiser: Callable
    x: torch.Tensor
    weights: torch.Tensor
    exact: dict[str, torch.Tensor]
    singular_values: dict[str, torch.Tensor]


@dataclass
class Outcome:
    """Cost and accuracy of one method on one subspace."""

    method: str
    subspace: str
    rounds: int
    forward_equivalents: int
    seconds: float
    sine: float
    converged: bool
    first_reach: int | None = None
    aligned_stop: int | None = None
    aligned_cost: int | None = None


def region_mask() -> torch.Tensor:
    mask = torch.zeros(SHAPE[1:])
    mask[4:12, 3:11] = 1
    return mask


def region_weights(subspace: str, weights: torch.Tensor) -> torch.Tensor:
    return weights if subspace == "edit" else 1 - weights


def subspace_rank(subspace: str) -> int:
    return RANK if subspace == "edit" else NULL_RANK


def closed_form_problem(image_seed: int) -> Problem:
    """Build a noisy sample of the regional Gaussian at SIGMA and the exact subspaces from its Jacobian."""
    mask = region_mask()
    model = regional_gaussian(SHAPE, mask, inside_rank=12, outside_rank=12, shared_rank=4, seed=0, floor=1e-3)
    noise = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1000 + image_seed), dtype=torch.float64)
    x = model.sample(1, seed=image_seed) + SIGMA * noise
    weights = mask.expand(SHAPE).to(torch.float64)

    jacobian = model.jacobian(x, SIGMA)
    exact, singular_values = {}, {}
    for subspace in SUBSPACES:
        rows = region_weights(subspace, weights).reshape(-1)
        _, values, right = torch.linalg.svd(rows[:, None] * jacobian)
        exact[subspace] = right[: subspace_rank(subspace)].T
        singular_values[subspace] = values[:12]
    return Problem(model, x, weights, exact, singular_values)


def sine_to_exact(exact: torch.Tensor, vectors: torch.Tensor) -> float:
    """Sine of the largest principal angle between exact columns [n, r] and vectors [r, ...]."""
    columns = vectors.reshape(vectors.shape[0], -1).T.to(torch.float64)
    return principal_angle_sine(exact, columns)


def start_seed(subspace: str, seed: int) -> int:
    # Both methods seed the null subspace with seed + 1, as find_directions does.
    return seed if subspace == "edit" else seed + 1


def run_ours(problem: Problem, subspace: str, seed: int, tolerance: float, max_rounds: int) -> Outcome:
    started = time.perf_counter()
    products = JacobianProducts(problem.denoiser, problem.x, SIGMA)
    found = masked_subspace(
        products, region_weights(subspace, problem.weights), subspace_rank(subspace),
        oversample=OVERSAMPLE, max_rounds=max_rounds, tolerance=tolerance, seed=start_seed(subspace, seed),
    )
    seconds = time.perf_counter() - started

    sine = sine_to_exact(problem.exact[subspace], found.vectors) if subspace in problem.exact else float("nan")
    return Outcome("ours", subspace, found.record.rounds, products.counter.forward_equivalents(), seconds, sine,
                   found.record.converged)


def run_published(
    problem: Problem,
    subspace: str,
    seed: int,
    rounds: int | None = None,
    observe: RoundObserver | None = None,
    products: JacobianProducts | None = None,
) -> Outcome:
    """Run the published procedure with its own stopping rule, or for exactly ``rounds`` rounds when given."""
    forced = {} if rounds is None else {"min_iter": rounds, "max_rounds": rounds}
    started = time.perf_counter()
    if products is None:
        products = JacobianProducts(problem.denoiser, problem.x, SIGMA)
    found = published_subspace(
        products, region_weights(subspace, problem.weights), subspace_rank(subspace), start_seed(subspace, seed),
        on_round=observe, **forced,
    )
    seconds = time.perf_counter() - started

    sine = sine_to_exact(problem.exact[subspace], found.vectors) if subspace in problem.exact else float("nan")
    return Outcome("published", subspace, found.rounds, products.counter.forward_equivalents(), seconds, sine,
                   found.converged)


def first_reach_ours(problem: Problem, subspace: str, seed: int) -> int | None:
    """Forward-equivalents of the first round whose Ritz subspace is within TARGET_SINE of the exact one.

    Runs with the same seed are repeatable, so a run stopped after m rounds
    (tolerance 0 never stops earlier) returns the iterate of round m.
    """
    for rounds in range(2, MAX_ROUNDS + 1):
        outcome = run_ours(problem, subspace, seed, tolerance=0.0, max_rounds=rounds)
        if outcome.sine <= TARGET_SINE:
            return outcome.forward_equivalents
    return None


def observe_published(problem: Problem, subspace: str, seed: int) -> Outcome:
    """Run the published procedure untimed and record when its iterate first reached TARGET_SINE.

    It also records the round at which the element-wise test would have
    stopped the loop had each vector's sign been aligned with the previous
    round's. Rounds past that one are spent on sign flips alone.
    """
    products = JacobianProducts(problem.denoiser, problem.x, SIGMA)
    reached: list[int] = []
    aligned: list[tuple[int, int]] = []
    previous: list[torch.Tensor] = []

    def observe(round_index: int, vectors: torch.Tensor) -> None:
        if not reached and principal_angle_sine(problem.exact[subspace], vectors.T.to(torch.float64)) <= TARGET_SINE:
            reached.append(products.counter.forward_equivalents())
        if previous and not aligned and round_index > PUBLISHED_MIN_ITER + 1:
            signs = torch.sign((vectors * previous[0]).sum(dim=1, keepdim=True))
            if torch.allclose(signs * vectors, previous[0], atol=PUBLISHED_ATOL):
                aligned.append((round_index, products.counter.forward_equivalents()))
        previous[:] = [vectors.clone()]

    outcome = run_published(problem, subspace, seed, observe=observe, products=products)
    outcome.first_reach = reached[0] if reached else None
    if aligned:
        outcome.aligned_stop, outcome.aligned_cost = aligned[0]
    return outcome


def warm_up(problem: Problem) -> None:
    # The first JVP through torch.func pays one-off setup costs that would otherwise land on whichever method runs first.
    run_ours(problem, "edit", 0, tolerance=0.0, max_rounds=2)
    run_published(problem, "edit", 0, rounds=1)


def measure_closed_form(problem: Problem, seed: int, repeats: int) -> list[Outcome]:
    """Measure both methods on both subspaces, with the oracle view from separate untimed runs.

    With ``repeats`` 0 nothing is timed, and the seconds include the
    observation. Otherwise the wall time is the fastest of ``repeats``
    interleaved runs.
    """
    outcomes = []
    for subspace in SUBSPACES:
        ours = run_ours(problem, subspace, seed, TOLERANCE, MAX_ROUNDS)
        published = observe_published(problem, subspace, seed)

        if repeats:
            warm_up(problem)
            ours_times, published_times = [], []
            for _ in range(repeats):
                ours_times.append(run_ours(problem, subspace, seed, TOLERANCE, MAX_ROUNDS).seconds)
                published_times.append(run_published(problem, subspace, seed).seconds)
            ours.seconds, published.seconds = min(ours_times), min(published_times)

        ours.first_reach = first_reach_ours(problem, subspace, seed)
        outcomes += [ours, published]
    return outcomes


def tolerance_sweep(problems: list[Problem], tolerances: tuple[float, ...]) -> list[str]:
    """Tabulate rounds and worst final sine of ours per tolerance, over all problems and both subspaces (untimed)."""
    lines = ["| tolerance | rounds (min-max) | forward-equivalents, both subspaces (min-max) | worst final sine |",
             "|---:|---|---|---:|"]
    for tolerance in tolerances:
        rounds, costs, sines = [], [], []
        for seed, problem in enumerate(problems):
            outcomes = [run_ours(problem, subspace, seed, tolerance, MAX_ROUNDS) for subspace in SUBSPACES]
            rounds += [o.rounds for o in outcomes]
            costs.append(sum(o.forward_equivalents for o in outcomes))
            sines += [o.sine for o in outcomes]
        lines.append(f"| {tolerance:g} | {min(rounds)}-{max(rounds)} | {min(costs)}-{max(costs)} | {max(sines):.4f} |")
    return lines


class SmallDenoiser(nn.Module):
    """Convolutions, group norm, two-head self-attention and a noise-level embedding, with EDM-style scalings.

    The attention is written out with matmul and softmax, because the fused
    kernels of nn.MultiheadAttention lack forward-mode AD.
    """

    def __init__(self, channels: int = 3, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.noise_embedding = nn.Linear(1, width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def self_attention(self, features: torch.Tensor) -> torch.Tensor:
        batch, width, height, breadth = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        head_width = width // self.heads
        query, key, value = self.qkv(tokens).reshape(batch, -1, 3, self.heads, head_width).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(query @ key.transpose(-1, -2) / head_width**0.5, dim=-1)
        mixed = (attention @ value).transpose(1, 2).reshape(batch, -1, width)
        return self.attention_out(mixed).transpose(1, 2).reshape(features.shape)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(1 + sigma**2)
        features = self.conv_in(c_in * x) + self.noise_embedding(sigma.log().view(-1, 1))[:, :, None, None]
        features = nn.functional.silu(self.norm(features))
        features = features + self.self_attention(features)
        features = nn.functional.silu(self.conv_mid(features))
        c_skip, c_out = 1 / (1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)
        return c_skip * x + c_out * self.conv_out(features)


def network_problem() -> Problem:
    torch.manual_seed(0)
    network = SmallDenoiser().eval()
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    return Problem(network, x, region_mask().expand(SHAPE).clone(), {}, {})


def network_spectrum_lines(problem: Problem) -> list[str]:
    """List the top singular values of the network's masked Jacobians, from a dense Jacobian by reverse mode."""
    sigmas = torch.full((1,), SIGMA)

    def flat_output(flat_input: torch.Tensor) -> torch.Tensor:
        return problem.denoiser(flat_input.reshape(problem.x.shape), sigmas).reshape(-1)

    with torch.no_grad():
        jacobian = torch.func.jacrev(flat_output, chunk_size=128)(problem.x.reshape(-1))
    lines = []
    for subspace in SUBSPACES:
        rows = region_weights(subspace, problem.weights).reshape(-1)
        values = torch.linalg.svdvals(rows[:, None] * jacobian)[: RANK + OVERSAMPLE + 1]
        lines.append(f"{subspace}: singular values {', '.join(f'{float(v):.3f}' for v in values)}")
    return lines


def measure_network(problem: Problem, rounds: dict[tuple[str, str], int]) -> list[Outcome]:
    """Time each method on the network for exactly the rounds it used on the closed-form problem, one run each."""
    warm_up(problem)
    outcomes = []
    for subspace in SUBSPACES:
        ours_rounds = rounds[("ours", subspace)]
        # Tolerance 0 never stops the iteration early. masked_subspace needs at least 2 rounds.
        outcomes.append(run_ours(problem, subspace, 0, tolerance=0.0, max_rounds=max(ours_rounds, 2)))
        outcomes.append(run_published(problem, subspace, 0, rounds=rounds[("published", subspace)]))
    return outcomes


def machine_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, nproc {usable}, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"Python {platform.python_version()}")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def format_optional(value: int | None, missing: str) -> str:
    return missing if value is None else str(value)


def outcome_table(outcomes: list[Outcome], with_accuracy: bool) -> list[str]:
    if not with_accuracy:
        lines = ["| subspace | method | rounds | forward-equivalents | wall time (ms) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {o.subspace} | {o.method} | {o.rounds} | {o.forward_equivalents} | {1000 * o.seconds:.1f} |"
                  for o in outcomes]
        return lines

    header = "| subspace | method | rounds | stopped by its rule | forward-equivalents | wall time (ms) |"
    rule = "|---|---|---:|---|---:|---:|"
    if with_accuracy:
        header += (f" final sine | forward-equivalents at first sine <= {TARGET_SINE} |"
                   " round the element-wise test would stop with signs aligned |")
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for outcome in outcomes:
        line = (f"| {outcome.subspace} | {outcome.method} | {outcome.rounds} | {'yes' if outcome.converged else 'no'} | "
                f"{outcome.forward_equivalents} | {1000 * outcome.seconds:.1f} |")
        if with_accuracy:
            aligned = "-" if outcome.method == "ours" else format_optional(outcome.aligned_stop, "never")
            line += f" {outcome.sine:.4f} | {format_optional(outcome.first_reach, 'never')} | {aligned} |"
        lines.append(line)
    return lines


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def totals(outcomes: list[Outcome], method: str) -> tuple[int, float]:
    chosen = [outcome for outcome in outcomes if outcome.method == method]
    return sum(o.forward_equivalents for o in chosen), sum(o.seconds for o in chosen)


def oracle_total(outcomes: list[Outcome], method: str) -> int | None:
    reaches = [outcome.first_reach for outcome in outcomes if outcome.method == method]
    return None if None in reaches else sum(reaches)


def summary_lines(outcomes: list[Outcome]) -> list[str]:
    ours_cost, ours_time = totals(outcomes, "ours")
    published_cost, published_time = totals(outcomes, "published")
    ours_oracle, published_oracle = oracle_total(outcomes, "ours"), oracle_total(outcomes, "published")
    accurate = all(outcome.sine <= TARGET_SINE for outcome in outcomes)
    lines = [
        f"both subspaces, each method's stopping rule: published {published_cost} / ours {ours_cost} "
        f"forward-equivalents = {ratio(published_cost, ours_cost)}; "
        f"wall time {1000 * published_time:.0f} ms / {1000 * ours_time:.0f} ms = {ratio(published_time, ours_time)}",
    ]
    if ours_oracle is not None and published_oracle is not None:
        lines.append(f"both subspaces, first sine <= {TARGET_SINE} (oracle): published {published_oracle} / "
                     f"ours {ours_oracle} forward-equivalents = {ratio(published_oracle, ours_oracle)}")
    lines.append(f"every final sine <= {TARGET_SINE}: {'yes' if accurate else 'no'}")
    return lines


def seed_summary(per_seed: list[list[Outcome]]) -> list[str]:
    rule_ratios, oracle_ratios, aligned_ratios, published_rounds, aligned_rounds = [], [], [], [], []
    for outcomes in per_seed:
        ours_cost = totals(outcomes, "ours")[0]
        rule_ratios.append(totals(outcomes, "published")[0] / ours_cost)
        ours_oracle, published_oracle = oracle_total(outcomes, "ours"), oracle_total(outcomes, "published")
        if ours_oracle and published_oracle:
            oracle_ratios.append(published_oracle / ours_oracle)
        published = [o for o in outcomes if o.method == "published"]
        published_rounds += [o.rounds for o in published]
        aligned_rounds += [format_optional(o.aligned_stop, "never") for o in published]
        if all(o.aligned_cost is not None for o in published):
            aligned_ratios.append(sum(o.aligned_cost for o in published) / ours_cost)
    ours_rounds = [o.rounds for outcomes in per_seed for o in outcomes if o.method == "ours"]
    worst_sine = max(o.sine for outcomes in per_seed for o in outcomes)

    def spread(values: list[float]) -> str:
        if not values:
            return "n/a"
        return f"median {statistics.median(values):.2f}x, min {min(values):.2f}x, max {max(values):.2f}x"

    return [
        f"over {len(per_seed)} problems (image and start seeds 0..{len(per_seed) - 1}), both subspaces:",
        f"- forward-equivalent ratio published / ours, stopping rules: {spread(rule_ratios)}",
        f"- forward-equivalent ratio published / ours, first sine <= {TARGET_SINE}: {spread(oracle_ratios)}",
        f"- rounds per subspace: ours {sorted(ours_rounds)}, published {sorted(published_rounds)}",
        f"- published, round the element-wise test would stop with signs aligned: {', '.join(aligned_rounds)}",
        f"- forward-equivalent ratio published with signs aligned / ours, stopping rules: {spread(aligned_ratios)}",
        f"- worst final sine of all runs: {worst_sine:.4f}",
    ]


def spectrum_lines(problem: Problem) -> list[str]:
    lines = []
    for subspace in SUBSPACES:
        values = problem.singular_values[subspace]
        rank = subspace_rank(subspace)
        lines.append(
            f"{subspace}: singular values {', '.join(f'{float(v):.3f}' for v in values[: rank + OVERSAMPLE + 1])}; "
            f"(s{rank + 1}/s{rank})^2 = {float(values[rank] / values[rank - 1]) ** 2:.3f}, "
            f"(s{rank + OVERSAMPLE + 1}/s{rank})^2 = {float(values[rank + OVERSAMPLE] / values[rank - 1]) ** 2:.3f}"
        )
    return lines


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="closed-form problems (image and start seeds 0..N-1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method on the closed form (fastest kept)")
    parser.add_argument("--skip-network", action="store_true", help="leave out the network timing")
    arguments = parser.parse_args()
    if arguments.seeds < 1 or arguments.repeats < 1:
        parser.error(f"--seeds {arguments.seeds} and --repeats {arguments.repeats} must both be at least 1")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.WARNING)
    # Runs stopped after a fixed number of rounds warn that they did not converge, which is intended here.
    logging.getLogger("loco_core.subspace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    torch.set_num_threads(1)
    started = time.perf_counter()

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine_description()}")
    print(f"ours: masked_subspace rank {RANK} / null rank {NULL_RANK}, oversample {OVERSAMPLE}, "
          f"tolerance {TOLERANCE}, max_rounds {MAX_ROUNDS}; "
          f"published: min_iter {PUBLISHED_MIN_ITER}, at most 50 rounds, atol {PUBLISHED_ATOL}")
    print(f"load average before (1, 5, 15 min): {load_average()}")

    problems = [closed_form_problem(seed) for seed in range(arguments.seeds)]
    print(f"\nclosed form: regional Gaussian, image {SHAPE}, sigma {SIGMA}, seed 0")
    print("\n".join(spectrum_lines(problems[0])))

    per_seed = [measure_closed_form(problem, seed, arguments.repeats if seed == 0 else 0)
                for seed, problem in enumerate(problems)]
    print(f"\nseed 0, wall time the fastest of {arguments.repeats} interleaved runs; "
          f"load average after: {load_average()}\n")
    print("\n".join(outcome_table(per_seed[0], with_accuracy=True)))
    print()
    print("\n".join(summary_lines(per_seed[0])))
    print()
    print("\n".join(seed_summary(per_seed)))

    print(f"\nours, tolerance sweep over the same {len(problems)} problems (untimed):\n")
    print("\n".join(tolerance_sweep(problems, SWEEP_TOLERANCES)))

    if not arguments.skip_network:
        rounds = {(outcome.method, outcome.subspace): outcome.rounds for outcome in per_seed[0]}
        print(f"\nnetwork: SmallDenoiser, float32, each method for its rounds on seed 0, one run; "
              f"load average before: {load_average()}\n")
        network_model = network_problem()
        network = measure_network(network_model, rounds)
        print("\n".join(outcome_table(network, with_accuracy=False)))
        ours_cost, ours_time = totals(network, "ours")
        published_cost, published_time = totals(network, "published")
        print(f"\nboth subspaces: forward-equivalents {published_cost} / {ours_cost} = {ratio(published_cost, ours_cost)}, "
              f"wall time {published_time:.2f} s / {ours_time:.2f} s = {ratio(published_time, ours_time)}; "
              f"load average after: {load_average()}")
        print("\nnetwork spectrum at the same point (dense Jacobian, untimed):")
        print("\n".join(network_spectrum_lines(network_model)))

    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
