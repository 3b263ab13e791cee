"""Save and load LOCO direction sets as safetensors in ComfyUI's output folder."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui
from safetensors import safe_open

from ..loco_core import DirectionSet, LocoError
from ..loco_core.directions import FORMAT_NAME
from .loco_types import Directions

logger = logging.getLogger(__name__)

CATEGORY = "LOCO/edit"
MAX_COUNTER = 99999


def _output_root() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def save_path(filename_prefix: str) -> Path:
    """Return the first free ``<prefix>_NNNNN.safetensors`` inside the output folder."""
    root = _output_root()
    prefix = filename_prefix.strip().replace("\\", "/")
    if not prefix or prefix.endswith("/"):
        raise LocoError(f"filename_prefix {filename_prefix!r} is empty or a folder; give a name such as 'loco/directions'")
    stem = (root / prefix).resolve()
    if not _inside(stem.parent, root):
        raise LocoError(f"filename_prefix {filename_prefix!r} points outside the output folder; use a relative name without '..'")

    for counter in range(1, MAX_COUNTER + 1):
        candidate = stem.parent / f"{stem.name}_{counter:05d}.safetensors"
        if not candidate.exists():
            return candidate
    raise LocoError(f"all {MAX_COUNTER} file names for prefix {filename_prefix!r} are taken; choose another prefix")


def direction_files() -> list[str]:
    """Direction files in the output folder, as paths relative to it."""
    root = _output_root()
    if not root.is_dir():
        return []
    names = []
    for path in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("format") != FORMAT_NAME:
                    continue
        except (OSError, ValueError, RuntimeError):
            continue
        names.append(path.relative_to(root).as_posix())
    return names


class LOCOSaveDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOSaveDirections",
            display_name="LOCO Save Directions",
            category=CATEGORY,
            description="Write a direction set to a new safetensors file in the output folder, with the settings "
            "and model fingerprint as metadata. Never overwrites: the name gets the next free counter.",
            inputs=[
                Directions.Input("directions", tooltip="The direction set to save."),
                io.String.Input("filename_prefix", default="loco/directions", tooltip="Path inside the output folder without extension; '_00001.safetensors' is appended."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file, relative to the output folder.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, directions, filename_prefix) -> io.NodeOutput:
        while True:
            path = save_path(filename_prefix)
            try:
                directions.save(path)
                break
            except LocoError:
                if path.exists():
                    # Another run took this name between the check and the write.
                    continue
                raise
        relative = path.relative_to(_output_root()).as_posix()
        logger.info("saved %d LOCO directions to %s", directions.rank, path)
        return io.NodeOutput(relative, ui=ui.PreviewText(relative))


class LOCOLoadDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOLoadDirections",
            display_name="LOCO Load Directions",
            category=CATEGORY,
            description="Load a direction set saved by LOCO Save Directions from the output folder. "
            "Edit nodes warn when the set was made with another model.",
            inputs=[
                io.Combo.Input("filename", options=direction_files(), tooltip="Direction file in the output folder."),
            ],
            outputs=[Directions.Output(display_name="directions", tooltip="The loaded direction set.")],
        )

    @classmethod
    def execute(cls, filename) -> io.NodeOutput:
        root = _output_root()
        path = (root / filename).resolve()
        if not _inside(path, root):
            raise LocoError(f"{filename!r} points outside the output folder; pick a file from the list")
        return io.NodeOutput(DirectionSet.load(path))

    @classmethod
    def fingerprint_inputs(cls, filename):
        path = _output_root() / filename
        return path.stat().st_mtime if path.exists() else filename


NODES = [LOCOSaveDirections, LOCOLoadDirections]
