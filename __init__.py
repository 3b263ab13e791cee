"""ComfyUI-LOCO: ComfyUI registers the nodes through ``comfy_entrypoint``."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
