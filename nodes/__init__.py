"""Node registration for ComfyUI (V3 schema).

Each module listed in ``NODE_MODULES`` exposes ``NODES``, a list of
``io.ComfyNode`` classes. Modules are imported when ComfyUI requests the
node list, so importing the pack stays cheap.
"""

import importlib

from comfy_api.latest import ComfyExtension, io

NODE_MODULES: tuple[str, ...] = ("attacks", "reproducibility", "models", "loco_edit", "loco_storage")


class LocoExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        node_classes: list[type[io.ComfyNode]] = []
        for module_name in NODE_MODULES:
            module = importlib.import_module(f".{module_name}", __name__)
            node_classes.extend(module.NODES)
        return node_classes


async def comfy_entrypoint() -> LocoExtension:
    return LocoExtension()
