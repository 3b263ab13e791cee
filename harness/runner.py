"""Run a shared workflow headless: ``python -m harness.runner WORKFLOW.json``.

The runner finds ComfyUI (``COMFYUI_PATH`` or the custom_nodes layout)
and loads this pack into it. It converts the UI-format workflow to an API
prompt with the live node schemas, checks it and executes it, in process by
default or with ``--server`` on a ComfyUI server it starts on 127.0.0.1.
It copies the files the workflow made to ``--output`` and logs a summary of
each output node. The pack's sample images are copied into ComfyUI's input
folder first, so the shipped workflows find them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .convert import WorkflowConversionError, object_info_from_mappings, ui_to_api, validate_workflow
from .locate import PACK_ROOT, find_comfyui

logger = logging.getLogger(__name__)

SAMPLES_DIR = PACK_ROOT / "assets" / "samples"

# Combo inputs whose choices depend on the files a user has installed. The
# check only requires a string there because the executor reports a missing file.
USER_FILE_INPUTS = (
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("LoadImage", "image"),
    ("LoadImageMask", "image"),
)

class WorkflowRunError(RuntimeError):
    """A workflow failed to validate, convert or execute."""


@dataclass
class RunSummary:
    """Result of one workflow run: copied files and the other UI values per node."""

    workflow: str
    seconds: float
    files: list[Path] = field(default_factory=list)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Render the summary: a heading, one line per file, then each node's values.

        A value that an earlier node already showed (a node's own text and a
        Preview Any of the same output) is listed once.
        """
        lines = [f"== {self.workflow} ({self.seconds:.1f} s)"]
        for path in self.files:
            lines.append(f"   made  {path}")
        shown: set[tuple[str, ...]] = set()
        for node_id, values in self.values.items():
            title = self.titles.get(node_id, node_id)
            for key, value in values.items():
                rendered = tuple(display_lines(value))
                if rendered in shown:
                    continue
                shown.add(rendered)
                heading = title if key == "text" else f"{title} {key}"
                lines.append(f"   {heading}:")
                lines.extend(f"      {line}" for line in rendered)
        return lines


def display_lines(value: Any, limit: int = 160) -> list[str]:
    """Turn a UI value into report lines: text as written, JSON compacted to one shortened line."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value.splitlines() or [""]
        if isinstance(value, str):
            return value.splitlines() or [""]
    text = json.dumps(value, default=str, separators=(",", ":"))
    return [text if len(text) <= limit else text[:limit] + "..."]


def load_workflow(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise WorkflowRunError(f"workflow file not found: {path}") from error
    except json.JSONDecodeError as error:
        raise WorkflowRunError(f"{path} is not valid JSON: {error}") from error


def to_prompt(workflow: dict, object_info: dict, name: str) -> dict:
    """Validate a workflow (UI or API format) and return its API prompt."""
    if "nodes" not in workflow:
        return workflow  # already API format; the executor validates it
    # Missing widget values are allowed here, as in the editor: a file saved
    # before a node gained an input runs with that input's default.
    errors = validate_workflow(workflow, object_info, name, ignore_combo_inputs=USER_FILE_INPUTS,
                               require_all_values=False)
    if errors:
        raise WorkflowRunError("workflow is invalid:\n  " + "\n  ".join(errors))
    try:
        return ui_to_api(workflow, object_info, name)
    except WorkflowConversionError as error:
        raise WorkflowRunError(str(error)) from error


def copy_samples(input_dir: Path) -> None:
    if SAMPLES_DIR.is_dir():
        for path in sorted(SAMPLES_DIR.iterdir()):
            if path.is_file():
                shutil.copy2(path, Path(input_dir) / path.name)


def _split_ui(ui: dict) -> tuple[list[dict], dict[str, Any]]:
    """Separate file references ({filename, subfolder, type}) from other UI values."""
    files, values = [], {}
    for key, value in ui.items():
        is_file_list = isinstance(value, list) and value and all(
            isinstance(item, dict) and "filename" in item and "type" in item for item in value
        )
        if is_file_list:
            files.extend(value)
        else:
            values[key] = value
    return files, values


def summarize(name: str, prompt: dict, ui_by_node: dict[str, dict], fetch_file, output_dir: Path,
              seconds: float) -> RunSummary:
    """Copy the files each output node made into ``output_dir`` and collect the other values."""
    summary = RunSummary(workflow=name, seconds=seconds)
    output_dir.mkdir(parents=True, exist_ok=True)
    for node_id, ui in ui_by_node.items():
        node = prompt.get(str(node_id), {})
        summary.titles[str(node_id)] = node.get("_meta", {}).get("title", node.get("class_type", str(node_id)))
        files, values = _split_ui(ui or {})
        for ref in files:
            target = output_dir / Path(ref["filename"]).name
            target.write_bytes(fetch_file(ref))
            summary.files.append(target)
        if values:
            summary.values[str(node_id)] = values
    return summary


# ---------------------------------------------------------------------------
# Executors


class InProcessExecutor:
    """Runs prompts through harness.inprocess.ComfySession in this process.

    Starts its own session unless one is given; a given session stays open
    on ``close()``.
    """

    def __init__(self, session=None):
        if session is None:
            from .inprocess import ComfySession  # imports ComfyUI, so only when used

            session = ComfySession(include_test_nodes=False).start()
            self._owns_session = True
        else:
            self._owns_session = False
        self.session = session
        copy_samples(self.session.input_dir)
        self._object_info = None

    def object_info(self) -> dict:
        if self._object_info is None:
            comfy_nodes = sys.modules["nodes"]  # ComfyUI's nodes.py, imported by the session
            self._object_info = object_info_from_mappings(comfy_nodes.NODE_CLASS_MAPPINGS,
                                                          comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
        return self._object_info

    def execute(self, prompt: dict) -> dict[str, dict]:
        return dict(self.session.run(prompt).ui)

    def fetch_file(self, ref: dict) -> bytes:
        folders = {"output": self.session.output_dir, "temp": self.session.temp_dir, "input": self.session.input_dir}
        folder = folders.get(ref.get("type", "output"))
        if folder is None:
            raise WorkflowRunError(f"unknown folder type {ref.get('type')!r} in UI output {ref}")
        return (folder / ref.get("subfolder", "") / ref["filename"]).read_bytes()

    def close(self) -> None:
        if self._owns_session:
            self.session.close()


class ServerExecutor:
    """Runs prompts on a ComfyUI server started on 127.0.0.1 for this run."""

    def __init__(self, comfy_root: Path):
        from .server import ComfyServer

        self._base = tempfile.TemporaryDirectory(prefix="loco-server-")
        self.server = ComfyServer(comfy_root, Path(self._base.name)).start()
        copy_samples(self.server.input_dir)

    def object_info(self) -> dict:
        return self.server.object_info()

    def execute(self, prompt: dict) -> dict[str, dict]:
        return self.server.run(prompt).get("outputs", {})

    def fetch_file(self, ref: dict) -> bytes:
        return self.server.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))

    def close(self) -> None:
        self.server.stop()
        self._base.cleanup()


def open_executor(use_server: bool):
    """Start the in-process session or a server; raises WorkflowRunError without ComfyUI."""
    comfy_root, reason = find_comfyui()
    if comfy_root is None:
        raise WorkflowRunError(reason)
    logger.info("ComfyUI found: %s", reason)
    return ServerExecutor(comfy_root) if use_server else InProcessExecutor()


def run_workflow(executor, workflow_path: Path, output_dir: Path) -> RunSummary:
    """Convert, execute and summarize one workflow file with an open executor."""
    name = Path(workflow_path).name
    prompt = to_prompt(load_workflow(workflow_path), executor.object_info(), name)
    started = time.perf_counter()
    try:
        ui = executor.execute(prompt)
    except Exception as error:
        raise WorkflowRunError(f"{name}: {error}") from error
    seconds = time.perf_counter() - started
    return summarize(name, prompt, ui, executor.fetch_file, Path(output_dir), seconds)


def run_workflows(paths: Iterable[Path], output_dir: Path, use_server: bool = False) -> list[RunSummary]:
    """Run several workflows on one executor; each gets a subfolder of ``output_dir``."""
    executor = open_executor(use_server)
    try:
        return [run_workflow(executor, path, Path(output_dir) / Path(path).stem) for path in paths]
    finally:
        executor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", nargs="+", type=Path, help="workflow JSON file(s), UI or API format")
    parser.add_argument("--server", action="store_true",
                        help="run on a ComfyUI server started on 127.0.0.1 instead of in this process")
    parser.add_argument("--output", type=Path, default=Path("loco_outputs"),
                        help="folder for the files the workflows make (default: ./loco_outputs)")
    parser.add_argument("--verbose", action="store_true", help="also show ComfyUI's own log messages")
    args = parser.parse_args(argv)
    # ComfyUI logs the tracebacks of optional core nodes it could not import
    # at WARNING, which would bury the summary.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)  # named __main__ under python -m

    try:
        summaries = run_workflows(args.workflow, args.output, use_server=args.server)
    except WorkflowRunError as error:
        logger.error("%s", error)
        return 1
    for summary in summaries:
        for line in summary.lines():
            logger.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
