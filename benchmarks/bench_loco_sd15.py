"""One LOCO edit end to end on the full-size SD1.5 UNet with random weights.

Every stage runs as its own prompt through ComfyUI's executor in this
process (harness ComfySession), so each is timed alone. Later prompts reuse
the cached outputs of earlier ones, and the script notes any node that a
prompt executed outside its own stage:

1. build      LOCOTestSD15Full: the SD1.5 UNet (859.5M parameters) with
              seeded float32 weights, as a MODEL
2. latent     LOCOTestConditioning (77 x 768), EmptyLatentImage and a short
              KSampler (cfg 1) that turns noise into a latent to edit
3. forward    LOCOPosteriorMean, one denoiser call on one image through the
              route the LOCO nodes use: the unit of cost (median of repeats)
4. invert     LOCOInvert to the edit level
5. find       LOCOFindDirections inside a centred square mask
   find_decoded   with --decoded only: the same search with mask_space
              'decoded image' through a full-size SD1.5 VAE (LOCOTestSDVAEFull,
              random weights, built inside this stage), so every Jacobian
              product also runs the VAE decoder
6. apply      LOCOApplyEdit with the first direction

Time is the wall-clock time of ``session.run`` and the CPU time of this
process over it, summed over threads. On a shared machine the wall time
grows with the other jobs' load, the CPU time much less. Memory is the
peak resident set size (RSS) of this process while the stage ran, sampled
by a psutil thread every 20 ms, so peaks shorter than that can be missed.
A failing stage is reported with ComfyUI's exception text and the stages
after it are skipped.

The defaults are small so that one run takes minutes on a CPU: 64x64
pixels, two ODE steps, and rank 1, null rank 1 and two rounds, which are
the smallest values the nodes accept. Usage with the settings of a real
edit:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_loco_sd15.py \\
        --size 512 --rank 5 --null-rank 5 --max-rounds 20 --invert-steps 40 --threads 2
"""

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.inprocess import ComfySession, PromptExecutionError  # noqa: E402

logger = logging.getLogger("bench_loco_sd15")

# SD1.5's VAE downsamples by 8; the UNet halves the latent three times.
PIXELS_PER_LATENT = 8
SIZE_MULTIPLE = 64
MEMORY_SAMPLE_SECONDS = 0.02
STAGE_NAMES = ("build", "latent", "forward", "invert", "find", "find_decoded", "apply")


class StageLogRecords(logging.Handler):
    """Log handler that keeps the LOCO pack's warnings and its JVP strategy messages during one stage.

    These records show whether a Jacobian product fell back to another
    strategy, which the node's report does not state.
    """

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "loco_core" not in record.name and "nodes.loco" not in record.name:
            return
        if record.levelno >= logging.WARNING or record.name.endswith("loco_core.jacobian"):
            self.messages.append(f"{record.levelname}: {record.getMessage()}")

    def __enter__(self) -> "StageLogRecords":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeHandler(self)


class PeakRSS:
    """Context manager that samples this process's RSS in a thread and keeps the maximum."""

    def __init__(self, interval: float = MEMORY_SAMPLE_SECONDS):
        self.interval = interval
        self.process = psutil.Process()
        self.start_bytes = 0
        self.peak_bytes = 0
        self.end_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.end_bytes = self.process.memory_info().rss
        self.peak_bytes = max(self.peak_bytes, self.end_bytes)


@dataclass
class StageResult:
    name: str
    nodes: str
    seconds: float | None = None
    cpu_seconds: float | None = None
    rss_start_gib: float | None = None
    rss_peak_gib: float | None = None
    rss_end_gib: float | None = None
    load_average: tuple[float, float] | None = None
    executed: list[str] = field(default_factory=list)
    log_messages: list[str] = field(default_factory=list)
    report: dict | None = None
    error: str | None = None
    notes: str = ""


def gib(value: int) -> float:
    return round(value / 2**30, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64,
                        help="image width and height in pixels, a multiple of 64 (latent size is size/8); default 64")
    parser.add_argument("--latent-steps", type=int, default=1,
                        help="KSampler steps that make the latent to edit; default 1")
    parser.add_argument("--edit-level", type=float, default=0.6,
                        help="LOCOInvert edit level, fraction of diffusion time in (0, 1); default 0.6")
    parser.add_argument("--invert-steps", type=int, default=2,
                        help="LOCOInvert ODE steps (LOCOApplyEdit decodes on the same grid); default 2")
    parser.add_argument("--rank", type=int, default=1, help="LOCOFindDirections rank; default 1")
    parser.add_argument("--null-rank", type=int, default=1, help="LOCOFindDirections null_rank; default 1")
    parser.add_argument("--max-rounds", type=int, default=2,
                        help="LOCOFindDirections max_rounds (at least 2); default 2")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="LOCOFindDirections tolerance (sine of the largest principal angle); default 1e-3")
    parser.add_argument("--jvp-strategy", default="auto", help="LOCOFindDirections jvp_strategy; default auto")
    parser.add_argument("--mask-fraction", type=float, default=0.5,
                        help="side of the centred square mask as a fraction of the image side; default 0.5")
    parser.add_argument("--strength", type=float, default=4.0, help="LOCOApplyEdit strength; default 4.0")
    parser.add_argument("--forward-repeats", type=int, default=2,
                        help="LOCOPosteriorMean runs for the forward-time unit (median); default 2")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the random UNet weights; default 0")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads; default 2")
    parser.add_argument("--stop-after", choices=STAGE_NAMES, default=STAGE_NAMES[-1],
                        help="last stage to run, e.g. 'forward' to time one denoiser call at a large --size; "
                        "default apply (all stages)")
    parser.add_argument("--decoded", action="store_true",
                        help="also time LOCOFindDirections with the mask on the VAE-decoded image")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.size <= 0 or args.size % SIZE_MULTIPLE != 0:
        parser.error(f"--size {args.size} must be a positive multiple of {SIZE_MULTIPLE}")
    if not 0.0 < args.mask_fraction < 1.0:
        parser.error(f"--mask-fraction {args.mask_fraction} must lie strictly between 0 and 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    if args.forward_repeats < 1:
        parser.error(f"--forward-repeats {args.forward_repeats} must be at least 1")
    return args


def mask_nodes(size: int, fraction: float) -> dict:
    """Build a size x size MASK that is 1 on a centred square (side a multiple of 8 pixels) and 0 elsewhere."""
    side = max(PIXELS_PER_LATENT, round(size * fraction / PIXELS_PER_LATENT) * PIXELS_PER_LATENT)
    offset = (size - side) // 2 // PIXELS_PER_LATENT * PIXELS_PER_LATENT
    return {
        "mask_zeros": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}},
        "mask_ones": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": side, "height": side}},
        "mask": {"class_type": "MaskComposite", "inputs": {
            "destination": ["mask_zeros", 0], "source": ["mask_ones", 0], "x": offset, "y": offset,
            "operation": "add"}},
    }


def stage_prompts(args: argparse.Namespace) -> list[tuple[str, dict, list[str]]]:
    """Return (stage name, nodes added by the stage, targets) in run order; each prompt contains all earlier nodes."""
    shared = {"model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0], "cfg": 1.0}
    stages = [
        ("build", {"model": {"class_type": "LOCOTestSD15Full", "inputs": {"seed": args.model_seed}}}, ["model"]),
        ("latent", {
            "positive": {"class_type": "LOCOTestConditioning",
                         "inputs": {"seed": 1, "tokens": 77, "context_dim": 768}},
            "negative": {"class_type": "LOCOTestConditioning",
                         "inputs": {"seed": 2, "tokens": 77, "context_dim": 768}},
            "empty": {"class_type": "EmptyLatentImage",
                      "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
            "latent": {"class_type": "KSampler", "inputs": {
                "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
                "latent_image": ["empty", 0], "seed": 3, "steps": args.latent_steps, "cfg": 1.0,
                "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        }, ["latent"]),
    ]
    stages.append(("invert", {"inversion": {"class_type": "LOCOInvert", "inputs": {
        **shared, "latent": ["latent", 0], "edit_level": args.edit_level, "steps": args.invert_steps}}},
        ["inversion"]))
    stages.append(("find", {**mask_nodes(args.size, args.mask_fraction), "directions": {
        "class_type": "LOCOFindDirections", "inputs": {
            **shared, "inversion": ["inversion", 0], "mask": ["mask", 0], "rank": args.rank,
            "null_rank": args.null_rank, "max_rounds": args.max_rounds, "tolerance": args.tolerance,
            "seed": 0, "batch_index": 0, "jvp_strategy": args.jvp_strategy}}}, ["directions"]))
    if args.decoded:
        stages.append(("find_decoded", {
            "vae": {"class_type": "LOCOTestSDVAEFull", "inputs": {"seed": args.model_seed}},
            "directions_decoded": {"class_type": "LOCOFindDirections", "inputs": {
                **stages[-1][1]["directions"]["inputs"], "mask_space": "decoded image", "vae": ["vae", 0]}},
        }, ["directions_decoded"]))
    stages.append(("apply", {"edited": {"class_type": "LOCOApplyEdit", "inputs": {
        **shared, "inversion": ["inversion", 0], "directions": ["directions", 0], "direction_index": 0,
        "strength": args.strength, "direction_weights": ""}}}, ["edited"]))
    return stages


def forward_prompt(prompt: dict, args: argparse.Namespace, noise_seed: int) -> dict:
    """Add one posterior-mean evaluation at the edit level to a copy of ``prompt``.

    A new noise seed on every run keeps ComfyUI from reusing the cached output.
    """
    prompt = dict(prompt)
    prompt["forward_sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["model", 0], "scheduler": "normal", "steps": 1, "denoise": args.edit_level}}
    prompt["forward"] = {"class_type": "LOCOPosteriorMean", "inputs": {
        "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
        "latent": ["latent", 0], "sigmas": ["forward_sigmas", 0], "noise_seed": noise_seed, "cfg": 1.0}}
    return prompt


def run_stage(session: ComfySession, name: str, prompt: dict, targets: list[str], label: str):
    """Run one prompt under the timer and the RSS sampler; return (StageResult, RunResult or None)."""
    stage = StageResult(name=name, nodes=label)
    load_before = os.getloadavg()[0]
    logger.info("stage %s: running %s", name, label)
    result = None
    with StageLogRecords() as records, PeakRSS() as memory:
        started = time.perf_counter()
        cpu_started = time.process_time()
        try:
            result = session.run(prompt, targets=targets)
        except PromptExecutionError as error:
            stage.error = f"{error.node_type} (node {error.node_id}): {error.exception_type}: {error.exception_message}"
            tail = "".join(error.traceback_lines[-6:]).strip()
            if tail:
                stage.error += "\n" + tail
            logger.error("stage %s failed: %s", name, stage.error)
        stage.seconds = round(time.perf_counter() - started, 2)
        stage.cpu_seconds = round(time.process_time() - cpu_started, 2)
    stage.rss_start_gib = gib(memory.start_bytes)
    stage.rss_peak_gib = gib(memory.peak_bytes)
    stage.rss_end_gib = gib(memory.end_bytes)
    stage.load_average = (round(load_before, 2), round(os.getloadavg()[0], 2))
    stage.log_messages = list(dict.fromkeys(records.messages))
    if result is not None:
        stage.executed = sorted(result.executed)
    logger.info("stage %s: %.2f s, peak RSS %.2f GiB", name, stage.seconds, stage.rss_peak_gib)
    return stage, result


def find_notes(report_text: str) -> str:
    """Rounds, forward-equivalents and leakage from LOCOFindDirections' JSON report."""
    report = json.loads(report_text)
    parameters = report.get("parameters", {})
    parts = []
    for key, label in (("edit_subspace", "edit"), ("null_subspace", "null")):
        record = parameters.get(key)
        if record:
            parts.append(f"{label}: {record['rounds']} rounds, {record['forward_equivalents']} forward-equivalents, "
                         f"converged {record['converged']}, last angle change {record['last_angle_change']:.3g}")
    parts.append(f"strategies used {parameters.get('strategies')}")
    for key in ("leakage_before", "leakage_after"):
        if key in report:
            parts.append(f"{key} {report[key]}")
    return "; ".join(parts)


def machine_description() -> dict:
    import torch

    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    comfyui_version = "unknown"
    try:
        import comfyui_version as version_module

        comfyui_version = version_module.__version__
    except ImportError:
        pass
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": model_name,
        "nproc": os.cpu_count(),
        "ram_gib": gib(psutil.virtual_memory().total),
        "available_ram_gib_at_start": gib(psutil.virtual_memory().available),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "comfyui": comfyui_version,
        "python": platform.python_version(),
    }


def markdown_table(stages: list[StageResult], forward_seconds: float | None) -> str:
    lines = [
        "| Stage | Nodes | Wall time (s) | CPU time (s) | Wall time / forward | RSS before (GiB) | "
        "Peak RSS (GiB) | Load average 1 min (start, end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in stages:
        ratio = "" if not forward_seconds or stage.seconds is None else f"{stage.seconds / forward_seconds:.1f}"
        time_text = "failed" if stage.error else f"{stage.seconds:.2f}"
        load = "" if stage.load_average is None else f"{stage.load_average[0]}, {stage.load_average[1]}"
        lines.append(f"| {stage.name} | {stage.nodes} | {time_text} | {stage.cpu_seconds} | {ratio} | {stage.rss_start_gib} | "
                     f"{stage.rss_peak_gib} | {load} |")
    return "\n".join(lines)


def run_forward_unit(session: ComfySession, prompt: dict, args: argparse.Namespace) -> tuple[StageResult, float | None]:
    """Time LOCOPosteriorMean ``forward_repeats`` times with fresh noise seeds; return the stage and the median."""
    times = []
    cpu_times = []
    stage = None
    for repeat in range(args.forward_repeats):
        stage, result = run_stage(session, "forward", forward_prompt(prompt, args, 100 + repeat),
                                  ["forward"], "LOCOPosteriorMean (1 image, cfg 1)")
        if result is None:
            return stage, None
        times.append(stage.seconds)
        cpu_times.append(stage.cpu_seconds)
    median = statistics.median(times)
    stage.notes = f"wall times {times} s, CPU times {cpu_times} s; the table shows the medians"
    stage.seconds = round(median, 2)
    stage.cpu_seconds = round(statistics.median(cpu_times), 2)
    return stage, median


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    stages: list[StageResult] = []
    forward_seconds = None
    with ComfySession() as session:
        info = machine_description()
        prompt: dict = {}
        for name, nodes, targets in stage_prompts(args):
            prompt.update(nodes)
            label = ", ".join(sorted({node["class_type"] for node in nodes.values()}))
            stage, result = run_stage(session, name, prompt, targets, label)
            stages.append(stage)
            if result is None:
                break
            notes = []
            unexpected = set(result.executed) - set(nodes)
            if unexpected:
                notes.append(f"also executed {sorted(unexpected)}")
            if name in ("find", "find_decoded"):
                report_text = result.values("directions" if name == "find" else "directions_decoded")[2]
                stage.report = json.loads(report_text)
                notes.append(find_notes(report_text))
            if name == "apply":
                edited = result.values("edited")[0]["samples"]
                notes.append(f"edited latent {tuple(edited.shape)}, finite {bool(torch.isfinite(edited).all())}")
            stage.notes = "; ".join(notes)
            if name == args.stop_after:
                break
            if name == "latent":
                forward_stage, forward_seconds = run_forward_unit(session, prompt, args)
                stages.append(forward_stage)
                if forward_seconds is None or args.stop_after == "forward":
                    break
        info["torch_threads"] = torch.get_num_threads()
        info["load_average_end"] = [round(value, 2) for value in os.getloadavg()]

    return {"settings": vars(args) | {"json": str(args.json) if args.json else None},
            "machine": info, "forward_seconds": forward_seconds,
            "stages": [stage.__dict__ for stage in stages],
            "table": markdown_table(stages, forward_seconds)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    outcome = run_benchmark(args)

    print(json.dumps({key: outcome[key] for key in ("settings", "machine", "forward_seconds")}, indent=2))
    print()
    print(outcome["table"])
    for stage in outcome["stages"]:
        if stage["notes"]:
            print(f"- {stage['name']}: {stage['notes']}")
        for message in stage["log_messages"]:
            print(f"- {stage['name']} log: {message}")
        if stage["error"]:
            print(f"- {stage['name']} FAILED: {stage['error']}")
    if args.json is not None:
        args.json.write_text(json.dumps(outcome, indent=2, default=str))
    return 1 if any(stage["error"] for stage in outcome["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
