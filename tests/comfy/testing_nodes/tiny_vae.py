"""Stable Diffusion-architecture VAEs with seeded weights: a tiny one for tests, the full size for benchmarks.

ComfyUI's own ``comfy.sd.VAE`` builds both from an AutoencoderKL
configuration. The tiny one has fewer channels than SD's (32 in place of
128) and one ResBlock per level; four levels keep SD's 8x downscale and 4
latent channels, so it pairs with LOCOTestTinySD15. The full one has SD's
configuration (83.7M parameters, 49.5M of them in the decoder). Weights
come from a seed and are loaded inside inference mode, as VAELoader loads a
file.
"""

import comfy.ldm.models.autoencoder
import comfy.sd
import torch
from comfy_api.latest import io

from .tiny_sd15 import seeded_state_dict

TINY_VAE_CONFIG = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}

# The configuration ComfyUI uses for an SD1.5 VAE file.
SD_VAE_CONFIG = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    },
}


def build_vae(seed: int, config: dict = TINY_VAE_CONFIG) -> comfy.sd.VAE:
    template = comfy.ldm.models.autoencoder.AutoencoderKL(**config).state_dict()
    state_dict = seeded_state_dict(template, seed)
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=state_dict, config={"params": config}, dtype=torch.float32)
    return vae


class LOCOTestTinyVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestTinyVAE",
            display_name="LOCO Test Tiny VAE",
            category="loco/testing",
            description="Test only: a small SD-architecture VAE (8x downscale, 4 latent channels) with seeded weights.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.Vae.Output(tooltip="Tiny AutoencoderKL in ComfyUI's VAE wrapper.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(build_vae(seed))


class LOCOTestSDVAEFull(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestSDVAEFull",
            display_name="LOCO Test SD VAE (full size)",
            category="loco/testing",
            description="Benchmark only: the SD1.5 VAE architecture with seeded float32 weights.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.Vae.Output(tooltip="SD1.5-architecture AutoencoderKL in ComfyUI's VAE wrapper.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(build_vae(seed, SD_VAE_CONFIG))


NODES = [LOCOTestTinyVAE, LOCOTestSDVAEFull]
