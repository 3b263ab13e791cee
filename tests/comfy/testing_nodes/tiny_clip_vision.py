"""A tiny CLIP vision model with seeded weights, as a CLIP_VISION value.

No CLIP vision checkpoint is available offline, and ComfyUI's loader only
detects full-size ones, so this node builds ComfyUI's own
``comfy.clip_vision.ClipVisionModel`` from a two-layer 32x32 configuration.
"""

import json
import tempfile
from pathlib import Path

import comfy.clip_vision
import torch
from comfy_api.latest import io

TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 16, "torch_dtype": "float32",
}


def build_tiny_clip_vision(seed: int) -> comfy.clip_vision.ClipVisionModel:
    # ClipVisionModel reads its configuration from a file path only.
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "tiny_clip_vision.json"
        config_path.write_text(json.dumps(TINY_CLIP_VISION_CONFIG))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))

    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, tensor in sorted(clip_vision.get_sd().items()):
        if "layer_norm" in name or "layrnorm" in name:
            state_dict[name] = torch.ones_like(tensor) if name.endswith("weight") else torch.zeros_like(tensor)
        else:
            state_dict[name] = 0.2 * torch.randn(tensor.shape, generator=generator)

    with torch.inference_mode():
        missing, unexpected = clip_vision.load_sd(state_dict)
    if missing or unexpected:
        raise RuntimeError(f"tiny CLIP vision state dict mismatch: missing {missing}, unexpected {unexpected}")
    return clip_vision


class LOCOTestTinyCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTestTinyCLIPVision",
            display_name="LOCO Test Tiny CLIP Vision",
            category="loco/testing",
            description="Test only: a two-layer CLIP vision model for 32x32 images with seeded weights.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.ClipVision.Output(tooltip="ComfyUI ClipVisionModel with 16-wide image embeddings.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_clip_vision(seed))


NODES = [LOCOTestTinyCLIPVision]
