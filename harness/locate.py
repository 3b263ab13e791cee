"""Find the ComfyUI checkout that the pack runs against.

Search order: the ``COMFYUI_PATH`` environment variable, then the folder
that contains this repository when it sits in ``ComfyUI/custom_nodes``.
Run as ``python -m harness.locate`` to print the path (exit code 1 when
there is none).
"""

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """Return the ComfyUI root and how it was found, or None and the reason it was not."""
    env_value = os.environ.get("COMFYUI_PATH", "").strip()
    if env_value:
        candidate = Path(env_value).expanduser().resolve()
        if is_comfyui_checkout(candidate):
            return candidate, f"COMFYUI_PATH={candidate}"
        return None, (
            f"COMFYUI_PATH={env_value} is not a ComfyUI checkout (no main.py, nodes.py and comfy/ there); "
            "point it at the folder that contains ComfyUI's main.py"
        )

    parent = PACK_ROOT.parent
    if parent.name == "custom_nodes" and is_comfyui_checkout(parent.parent):
        return parent.parent, f"pack installed in {parent}"

    return None, (
        "no ComfyUI checkout found: set COMFYUI_PATH to a ComfyUI folder "
        "or place this pack in ComfyUI/custom_nodes"
    )


def main() -> int:
    root, reason = find_comfyui()
    if root is None:
        print(reason, file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
