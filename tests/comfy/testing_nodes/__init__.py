"""Test-only ComfyUI node pack for the ComfyUI tier of the tests.

The harness links this folder into its temporary custom_nodes/ as
``loco_testing_nodes``; it is never installed for users. Node ids start
with ``LOCOTest``.
"""

from comfy_api.latest import ComfyExtension, io

from .full_sd15 import NODES as FULL_SD15_NODES
from .tiny_clip_vision import NODES as TINY_CLIP_VISION_NODES
from .tiny_sd15 import NODES as TINY_SD15_NODES
from .tiny_vae import NODES as TINY_VAE_NODES


class LocoTestingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*TINY_SD15_NODES, *TINY_VAE_NODES, *TINY_CLIP_VISION_NODES, *FULL_SD15_NODES]


async def comfy_entrypoint() -> LocoTestingExtension:
    return LocoTestingExtension()
