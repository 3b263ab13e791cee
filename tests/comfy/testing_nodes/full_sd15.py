"""The full-size SD1.5 UNet with seeded random weights, as a ComfyUI MODEL.

For benchmarks that need the real architecture's cost and memory without a
checkpoint file. The configuration is the one ComfyUI's
``comfy.model_detection`` reads from an SD1.5 checkpoint (ComfyUI 0.3.64), and
``comfy.supported_models.SD15`` adds its 8 attention heads, so the model has
SD1.5's 859.5M parameters (3.4 GB in float32). The weights carry no meaning.
"""

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch
from comfy_api.latest import io

from .tiny_sd15 import seeded_value

# Width of CLIP ViT-L/14 token embeddings, SD1.5's cross-attention context.
SD15_CONTEXT_DIM = 768


def full_sd15_unet_config() -> dict:
    """Return the UNet configuration ComfyUI detects for an SD1.5 checkpoint.

    Four levels of two ResBlocks each; levels 0-2 have one transformer per
    ResBlock, the lowest level (8x8 at 512x512) has none.
    """
    return {
        "image_size": 32,
        "use_checkpoint": False,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        # One entry per ResBlock on the way down. On the way up each level
        # has num_res_blocks + 1 blocks and the UNet reads the list from the
        # end, so the lowest level's three blocks come last.
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": SD15_CONTEXT_DIM,
        "adm_in_channels": None,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def check_detected_as_sd15(model) -> None:
    """Raise unless ComfyUI's checkpoint detection reads the model's state dict as SD1.5 with this configuration."""
    state_dict = model.diffusion_model.state_dict()
    detected = comfy.model_detection.model_config_from_unet(state_dict, "")
    if type(detected) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects the built UNet as {type(detected).__name__}, not SD15")

    expected = {key: value for key, value in model.model_config.unet_config.items() if key != "dtype"}
    found = {key: value for key, value in detected.unet_config.items() if key != "dtype"}
    if expected != found:
        raise RuntimeError(f"ComfyUI detects UNet configuration {found}, but the model was built with {expected}")


def fill_seeded_weights(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every state-dict tensor of ``module`` in place with seeded values.

    The values equal ``tiny_sd15.seeded_state_dict(module.state_dict(), seed)``.
    Copying tensor by tensor, instead of handing a whole state dict to
    ``load_model_weights``, keeps a second 3.4 GB copy out of memory.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state_dict = module.state_dict()
    for key in sorted(state_dict):
        target = state_dict[key]
        target.copy_(seeded_value(key, target.shape, generator))


def build_full_sd15(seed: int) -> comfy.model_patcher.ModelPatcher:
    """Build the full SD1.5 UNet with seeded float32 weights as a ComfyUI MODEL (ModelPatcher)."""
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()

    model_config = comfy.supported_models.SD15(full_sd15_unet_config())
    manual_cast_dtype = comfy.model_management.unet_manual_cast(
        torch.float32, load_device, model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(torch.float32, manual_cast_dtype)

    # Inference tensors, like a checkpoint loaded by a node, also when this
    # function runs outside ComfyUI's executor.
    with torch.inference_mode():
        model = model_config.get_model({}, "")
        model = model.to(offload_device)
        fill_seeded_weights(model.diffusion_model, seed)

    check_detected_as_sd15(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class LOCOTestSD15Full(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestSD15Full",
            display_name="LOCO Test Full SD1.5 UNet (random weights)",
            category="loco/testing",
            description=(
                "Test and benchmark only: the full-size SD1.5 UNet (859.5M parameters, 3.4 GB in float32, "
                f"context width {SD15_CONTEXT_DIM}) with weights drawn from a seed, as a MODEL. "
                "Pair it with LOCOTestConditioning at context_dim 768."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Seed of the random weights; equal seeds give equal models."),
            ],
            outputs=[io.Model.Output(tooltip="Full SD1.5 UNet wrapped in a ModelPatcher (epsilon prediction).")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(build_full_sd15(seed))


NODES = [LOCOTestSD15Full]
