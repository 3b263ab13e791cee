"""Run every shipped workflow that works on the embedded models and report the results.

Usually started through ``bash scripts/main_job.sh`` (which prepares the
virtual environment). Finds ComfyUI through ``COMFYUI_PATH`` or the
custom_nodes layout and stops with exit code 2 and a message without one.
A workflow counts as runnable on the embedded models when its file sets
``extra.comfyui_loco.embedded_models`` (scripts/make_workflows.py writes
that flag). Prints the files each workflow made and the values its output
nodes report: edit directions, reproducibility scores, attack results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: the pack's nodes/ package must not shadow ComfyUI's nodes.py.
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))

from harness.locate import find_comfyui  # noqa: E402
from harness.runner import WorkflowRunError, open_executor, run_workflow  # noqa: E402

WORKFLOW_DIR = PACK_ROOT / "workflows"


def embedded_workflows(folder: Path = WORKFLOW_DIR) -> list[Path]:
    """Return the shipped workflows marked as runnable on the embedded models, by file name."""
    selected = []
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text()).get("extra", {}).get("comfyui_loco", {})
        if meta.get("embedded_models"):
            selected.append(path)
    return selected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", type=Path,
                        help="workflow files to run (default: every shipped workflow for the embedded models)")
    parser.add_argument("--output", type=Path, default=PACK_ROOT / "loco_outputs",
                        help="folder for the made files, one subfolder per workflow (default: loco_outputs in the pack folder)")
    parser.add_argument("--server", action="store_true",
                        help="run on a ComfyUI server on 127.0.0.1 instead of in this process")
    args = parser.parse_args(argv)
    # ComfyUI logs start-up details and the tracebacks of optional core nodes
    # it could not import at WARNING; the report below is the output here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    comfy_root, reason = find_comfyui()
    if comfy_root is None:
        print(f"main job: {reason}", file=sys.stderr)
        print("main job: for example: COMFYUI_PATH=/path/to/ComfyUI bash scripts/main_job.sh", file=sys.stderr)
        return 2

    paths = args.workflows or embedded_workflows()
    if not paths:
        print(f"main job: no workflow in {WORKFLOW_DIR} is marked for the embedded models", file=sys.stderr)
        return 1
    print(f"main job: ComfyUI {comfy_root}; running {len(paths)} workflow(s); outputs in {args.output}")

    started = time.perf_counter()
    failures = 0
    executor = open_executor(args.server)
    try:
        for path in paths:
            try:
                summary = run_workflow(executor, path, args.output / path.stem)
            except WorkflowRunError as error:
                failures += 1
                print(f"== {path.name} FAILED\n   {error}")
                continue
            print("\n".join(summary.lines()))
    finally:
        executor.close()

    print(f"main job: {len(paths) - failures} of {len(paths)} workflow(s) finished "
          f"in {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
