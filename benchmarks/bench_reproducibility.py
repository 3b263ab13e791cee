"""Throughput of LOCOCompareModels against plain KSampler runs doing the same sampling.

Both sides sample two models for the same number of seeds and steps and
decode the results through ComfyUI's executor in this process (harness
ComfySession):

- comparison: LOCOSeedNoise -> two LOCOComparisonModel -> LOCOCompareModels
  (sampling, decoding, all metrics, pictures and the report);
- plain: one KSampler + VAEDecode per model on a batch of the same size.

Each timed prompt uses seeds not run before, so no cached output is reused,
after one warm-up run that loads the models. The goal is at most 10%
overhead of the comparison over the plain runs.

Usage:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_reproducibility.py \\
        --models digits --seeds 16 --steps 20 --repeats 3

``--models digits`` uses the pack's embedded models A and B (32x32 pixel
space); ``--models tiny`` uses the tiny SD1.5 test model (two weight seeds).
"""

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.inprocess import ComfySession  # noqa: E402

def model_nodes(kind: str) -> tuple[dict, list[str], int, int]:
    """Return the nodes that load two models, their node ids, the latent channels and the latent size."""
    if kind == "digits":
        nodes = {
            f"load_{label}": {"class_type": "LOCOLoadDiffusionModel",
                              "inputs": {"model_name": f"pack/loco_digits_{label}.safetensors",
                                         "weight_dtype": "default"}}
            for label in ("a", "b")
        }
        return nodes, ["load_a", "load_b"], 3, 32
    if kind == "tiny":
        nodes = {f"load_{label}": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": seed}}
                 for label, seed in (("a", 0), ("b", 1))}
        return nodes, ["load_a", "load_b"], 4, 16
    raise ValueError(f"unknown model kind {kind!r}; use 'digits' or 'tiny'")


def conditioning_nodes(kind: str) -> tuple[dict, list]:
    if kind == "digits":
        return {}, ["load_a", 1]
    return {"positive": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 1, "tokens": 4}}}, ["positive", 0]


def shared_nodes(kind: str, start_seed: int, seeds: int) -> tuple[dict, list[str], list]:
    models, model_ids, channels, size = model_nodes(kind)
    conditioning, positive = conditioning_nodes(kind)
    nodes = {**models, **conditioning,
             "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
             "noise": {"class_type": "LOCOSeedNoise",
                       "inputs": {"start_seed": start_seed, "count": seeds, "latent_channels": channels,
                                  "latent_height": size, "latent_width": size}}}
    return nodes, model_ids, positive


def comparison_prompt(kind: str, start_seed: int, seeds: int, steps: int, batch_size: int,
                      batch_invariant: bool) -> dict:
    prompt, model_ids, positive = shared_nodes(kind, start_seed, seeds)
    prompt["entry_a"] = {"class_type": "LOCOComparisonModel",
                         "inputs": {"model": [model_ids[0], 0], "vae": ["vae", 0], "label": "A",
                                    "positive": positive}}
    prompt["entry_b"] = {"class_type": "LOCOComparisonModel",
                         "inputs": {"model": [model_ids[1], 0], "vae": ["vae", 0], "label": "B",
                                    "positive": positive, "previous_models": ["entry_a", 0]}}
    prompt["compare"] = {"class_type": "LOCOCompareModels",
                         "inputs": {"models": ["entry_b", 0], "noise": ["noise", 0], "sampler_name": "euler",
                                    "scheduler": "karras", "steps": steps, "cfg": 1.0, "batch_size": batch_size,
                                    "batch_invariant": batch_invariant, "metric": "ssim", "null_quantile": 0.99,
                                    "memorization_threshold_mode": "calibrate", "memorization_threshold": 0.9}}
    return prompt


def plain_prompt(kind: str, start_seed: int, seeds: int, steps: int) -> dict:
    # The noise node's empty_latent output is an all-zero latent of the right
    # shape and batch size; KSampler draws its own noise from the seed.
    prompt, model_ids, positive = shared_nodes(kind, start_seed, seeds)
    for index, model_id in enumerate(model_ids):
        prompt[f"ksampler_{index}"] = {
            "class_type": "KSampler",
            "inputs": {"model": [model_id, 0], "positive": positive, "negative": positive,
                       "latent_image": ["noise", 2], "seed": start_seed, "steps": steps, "cfg": 1.0,
                       "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0},
        }
        prompt[f"decode_{index}"] = {"class_type": "VAEDecode",
                                     "inputs": {"samples": [f"ksampler_{index}", 0], "vae": ["vae", 0]}}
    return prompt


def format_times(times: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in times)


def timed_run(session: ComfySession, prompt: dict, targets: list[str]) -> float:
    started = time.perf_counter()
    session.run(prompt, targets=targets)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=("digits", "tiny"), default="digits", help="models to sample")
    parser.add_argument("--seeds", type=int, default=16, help="seeds (images) per model and run")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="seeds per sampler call in the comparison; 0 = all seeds in one call like KSampler")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="set the comparison's batch_invariant input (one row per model call)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or args.seeds

    with ComfySession() as session:
        # Warm-up: load the models and run both graphs once.
        warm_up = comparison_prompt(args.models, 10_000, 2, 2, batch_size, args.batch_invariant)
        session.run(warm_up, targets=["compare"])
        session.run(plain_prompt(args.models, 10_000, 2, 2), targets=["decode_0", "decode_1"])

        comparison_times, plain_times = [], []
        for repeat in range(args.repeats):
            start_seed = 1_000 * (repeat + 1)
            comparison_times.append(timed_run(
                session, comparison_prompt(args.models, start_seed, args.seeds, args.steps, batch_size,
                                       args.batch_invariant),
                ["compare"]))
            plain_times.append(timed_run(
                session, plain_prompt(args.models, start_seed + 500, args.seeds, args.steps),
                ["decode_0", "decode_1"]))

        import comfy.model_management

        device_name = str(comfy.model_management.get_torch_device())

    comparison = statistics.median(comparison_times)
    plain = statistics.median(plain_times)
    overhead = (comparison - plain) / plain
    # The results are this command's output, so they go to stdout.
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device_name}")
    print(f"models {args.models}, {args.seeds} seeds x 2 models, {args.steps} steps, "
          f"comparison batch size {batch_size}, batch_invariant {args.batch_invariant}, {args.repeats} repeats")
    print(f"comparison node:   median {comparison:.2f} s ({format_times(comparison_times)}) = "
          f"{args.seeds / comparison:.2f} seeds/s")
    print(f"two KSampler runs: median {plain:.2f} s ({format_times(plain_times)}) = {args.seeds / plain:.2f} seeds/s")
    print(f"overhead of the comparison: {100 * overhead:+.1f}% (goal: at most +10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
