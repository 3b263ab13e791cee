"""A tiny SD1.5-architecture MODEL and matching CONDITIONING for fast tests.

The model is built from ComfyUI's own classes (``comfy.supported_models.SD15``,
``BaseModel``, ``ModelPatcher``) the way
``comfy.sd.load_diffusion_model_state_dict`` builds a checkpoint's UNet, so
stock nodes (KSampler, LoraLoaderModelOnly, ModelSamplingDiscrete) accept it.
Only the sizes are reduced and the weights come from a seed.
"""

import math

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch
from comfy_api.latest import io

# Width of the cross-attention context (768 in SD1.5). LOCOTestConditioning
# produces tensors of this width.
TINY_CONTEXT_DIM = 64

# SD15's unet_extra_config forces 8 heads; 2 heads keep head widths of 16
# and 32 channels at model_channels 32.
TINY_NUM_HEADS = 2

# ResBlocks normalize with GroupNorm(32, channels), so every width must be a
# multiple of 32.
CHANNEL_STEP = 32


def tiny_unet_config(model_channels: int) -> dict:
    """Return an SD1.5 UNet configuration reduced to two levels of one ResBlock each."""
    return {
        "image_size": 32,
        "use_checkpoint": False,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        # One transformer per ResBlock on the way down, one per output block
        # (num_res_blocks + 1 per level) on the way up, one in the middle.
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": TINY_CONTEXT_DIM,
        "adm_in_channels": None,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def seeded_state_dict(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Draw weights for every tensor of ``template`` from ``seed``.

    Matrices and kernels get normal values scaled by 1/sqrt(fan_in), so
    activations keep about unit scale through the blocks; norm scales are 1
    and biases small.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {key: seeded_value(key, template[key].shape, generator) for key in sorted(template)}


def seeded_value(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Draw the value of one state-dict tensor; keys must be visited in sorted order for a seed to repeat."""
    if key.endswith("weight") and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    if key.endswith("weight"):
        return torch.ones(shape)
    return 0.01 * torch.randn(shape, generator=generator)


def build_tiny_sd15(seed: int, model_channels: int = 32) -> comfy.model_patcher.ModelPatcher:
    """Build the tiny SD1.5 UNet as a ComfyUI MODEL (ModelPatcher)."""
    if model_channels <= 0 or model_channels % CHANNEL_STEP != 0:
        raise ValueError(
            f"model_channels is {model_channels}; it must be a positive multiple of {CHANNEL_STEP} "
            "because the UNet's GroupNorm layers use 32 groups"
        )

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()

    model_config = comfy.supported_models.SD15(tiny_unet_config(model_channels))
    model_config.unet_config["num_heads"] = TINY_NUM_HEADS
    # float32 weights, as a dtype override in load_diffusion_model_state_dict
    # would give; tests compare numbers and want no half precision on GPUs.
    manual_cast_dtype = comfy.model_management.unet_manual_cast(
        torch.float32, load_device, model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(torch.float32, manual_cast_dtype)

    # ComfyUI runs nodes inside inference mode. The weights are made there
    # explicitly, so they are inference tensors like a loaded checkpoint's
    # even when this function is called outside the executor.
    with torch.inference_mode():
        model = model_config.get_model({}, "")
        model = model.to(offload_device)
        template = model.diffusion_model.state_dict()
        model.load_model_weights(seeded_state_dict(template, seed), "")

    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def seeded_conditioning(seed: int, tokens: int, context_dim: int = TINY_CONTEXT_DIM) -> list:
    """Return CONDITIONING in ComfyUI's format: ``[[cond [1, tokens, context_dim], {}]]``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cond = torch.randn((1, tokens, context_dim), generator=generator)
    return [[cond, {}]]


class LOCOTestTinySD15(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestTinySD15",
            display_name="LOCO Test Tiny SD1.5 Model",
            category="loco/testing",
            description=(
                "Test only: a small SD1.5-architecture UNet (2 levels, 1 ResBlock each, "
                f"context width {TINY_CONTEXT_DIM}) with weights drawn from a seed, as a MODEL."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Seed of the random weights; equal seeds give equal models."),
                io.Int.Input("model_channels", default=32, min=CHANNEL_STEP, max=256, step=CHANNEL_STEP,
                             optional=True,
                             tooltip="Base channel count of the UNet, a multiple of 32 (SD1.5: 320)."),
            ],
            outputs=[io.Model.Output(tooltip="Tiny SD1.5 UNet wrapped in a ModelPatcher (epsilon prediction).")],
        )

    @classmethod
    def execute(cls, seed: int, model_channels: int = 32) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_sd15(seed, model_channels))


class LOCOTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestConditioning",
            display_name="LOCO Test Conditioning",
            category="loco/testing",
            description=(
                "Test only: CONDITIONING with a seeded random context of shape "
                f"[1, tokens, context_dim] (default {TINY_CONTEXT_DIM}, for LOCOTestTinySD15)."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Seed of the random context tensor."),
                io.Int.Input("tokens", default=4, min=1, max=77,
                             tooltip="Number of context tokens, 1..77 (the CLIP length of SD1.5)."),
                io.Int.Input("context_dim", default=TINY_CONTEXT_DIM, min=1, max=4096, optional=True,
                             tooltip=f"Width of each context token: {TINY_CONTEXT_DIM} for LOCOTestTinySD15, "
                             "768 for the full SD1.5 UNet (LOCOTestSD15Full)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="[[context [1, tokens, context_dim], {}]], ComfyUI's format.")],
        )

    @classmethod
    def execute(cls, seed: int, tokens: int, context_dim: int = TINY_CONTEXT_DIM) -> io.NodeOutput:
        return io.NodeOutput(seeded_conditioning(seed, tokens, context_dim))


NODES = [LOCOTestTinySD15, LOCOTestConditioning]
