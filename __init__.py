"""ComfyUI-LOCO: ComfyUI registers the nodes through ``comfy_entrypoint``.

The node modules need ComfyUI's ``comfy_api`` package. Outside ComfyUI (for
example when pytest imports this folder as a package while collecting the
core tests) there is nothing to register, so the import is skipped there.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
