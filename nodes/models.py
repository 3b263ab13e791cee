"""Loader for small pixel-space diffusion models stored with their UNet configuration.

The pack ships such models in assets/models, trained by
scripts/train_embedded.py on 32x32 colour digits. Files of the same format
in ComfyUI's diffusion_models folders are offered too. A file qualifies when
its safetensors metadata has ``format`` = ``loco-pixel-diffusion`` and JSON
strings ``unet_config`` (keyword arguments of ComfyUI's ``UNetModel``) and
``sampling_settings`` (the discrete noise schedule).

The loader builds a real ComfyUI MODEL the way
``comfy.sd.load_diffusion_model_state_dict`` does, minus the detection step:
model config, inference dtype, ``get_model``, ``load_model_weights`` and a
``ModelPatcher``. The models work in pixel space, so they pair with the stock
VAELoader value ``pixel_space`` (0..1 images to -1..1 latents and back).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils
import folder_paths
from comfy_api.latest import io

logger = logging.getLogger(__name__)

FORMAT_NAME = "loco-pixel-diffusion"
SUPPORTED_FORMAT_VERSIONS = ("1",)
PACK_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
PACK_PREFIX = "pack/"
DIFFUSION_FOLDER = "diffusion_models"
WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The metadata's model_type names the UNet's output: the noise (eps) or
# alpha * noise - sigma * alpha * x0 (v). Files without the key predate v models.
MODEL_TYPES = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}


class PixelLatentFormat(comfy.latent_formats.LatentFormat):
    """Latent format of pixel-space models: 3 channels in -1..1, scale 1.0, identity preview."""

    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class UnconditionalModel(comfy.model_base.BaseModel):
    """Model whose UNet has no cross-attention input.

    The conditioning's tensor is dropped before it reaches the UNet, so any
    CONDITIONING can feed KSampler's positive and negative inputs.
    """

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        out.pop("c_crossattn", None)
        out.pop("crossattn_controlnet", None)
        return out


class PixelDiffusionConfig(comfy.supported_models_base.BASE):
    """Model config built from file metadata instead of detection.

    ``unet_extra_config`` is empty because the base class default would force
    64-channel attention heads onto the stored configuration.
    """

    unet_config = {}
    unet_extra_config = {}
    latent_format = PixelLatentFormat
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, unet_config: dict, sampling_settings: dict, model_type: comfy.model_base.ModelType):
        super().__init__(unet_config)
        self.sampling_settings = dict(sampling_settings)
        self.model_type = model_type

    def get_model(self, state_dict, prefix="", device=None):
        return UnconditionalModel(self, model_type=self.model_type, device=device)


# ---------------------------------------------------------------------------
# Files.


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _is_pixel_diffusion_file(path: Path) -> bool:
    try:
        return _read_metadata(path).get("format") == FORMAT_NAME
    except (OSError, ValueError, RuntimeError) as error:
        # An unreadable or non-safetensors file is simply not offered.
        logger.debug("skipping %s: %s", path, error)
        return False


def model_files() -> list[str]:
    """Return the loader's choices: the pack's models ("pack/..."), then compatible diffusion_models files."""
    choices = []
    if PACK_MODELS_DIR.is_dir():
        for path in sorted(PACK_MODELS_DIR.glob("*.safetensors")):
            if _is_pixel_diffusion_file(path):
                choices.append(PACK_PREFIX + path.name)

    for name in folder_paths.get_filename_list(DIFFUSION_FOLDER):
        if not name.endswith(".safetensors"):
            continue
        full_path = folder_paths.get_full_path(DIFFUSION_FOLDER, name)
        if full_path and _is_pixel_diffusion_file(Path(full_path)):
            choices.append(name)
    return choices


def resolve_model_path(name: str) -> Path:
    """Map a choice to its file, rejecting anything outside the pack's models and the diffusion_models folders."""
    if not name.endswith(".safetensors"):
        raise ValueError(f"model {name!r} is not a .safetensors file; choose one of the listed models")

    if name.startswith(PACK_PREFIX):
        file_name = name[len(PACK_PREFIX):]
        if Path(file_name).name != file_name:
            raise ValueError(
                f"model {name!r} points outside the pack's assets/models folder; "
                f"use {PACK_PREFIX}<file name> without folders"
            )
        path = PACK_MODELS_DIR / file_name
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r} not found in the pack's assets/models folder")
        return path

    # get_full_path joins the name under each configured folder after
    # normalising it, so ".." cannot leave those folders.
    full_path = folder_paths.get_full_path(DIFFUSION_FOLDER, name)
    if full_path is None:
        raise FileNotFoundError(
            f"model {name!r} not found in the diffusion_models folders "
            f"({', '.join(folder_paths.get_folder_paths(DIFFUSION_FOLDER))}) or the pack; "
            "refresh the node list or copy the file there"
        )
    return Path(full_path)


def parse_model_metadata(metadata: dict[str, str], source: str) -> tuple[dict, dict, comfy.model_base.ModelType]:
    """Check the metadata of a pixel-diffusion file and return ``(unet_config, sampling_settings, model_type)``."""
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{source} has no '{FORMAT_NAME}' metadata (format={metadata.get('format')!r}); this loader "
            "needs the UNet configuration stored in the file, so load other diffusion models with "
            "ComfyUI's 'Load Diffusion Model' node"
        )
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{source} has format_version {version!r}; this pack reads versions {SUPPORTED_FORMAT_VERSIONS}, "
            "update the pack"
        )
    model_type = metadata.get("model_type", "eps")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{source} has unsupported model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}. "
            "Re-save the file with one of them"
        )

    parsed = {}
    for key in ("unet_config", "sampling_settings"):
        if key not in metadata:
            raise ValueError(f"{source} metadata is missing {key!r}; re-save the file with scripts/train_embedded.py")
        try:
            parsed[key] = json.loads(metadata[key])
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} metadata {key!r} is not valid JSON: {error}") from error
        if not isinstance(parsed[key], dict):
            raise ValueError(f"{source} metadata {key!r} must be a JSON object, got {type(parsed[key]).__name__}")

    unet_config = parsed["unet_config"]
    if unet_config.get("in_channels") != 3 or unet_config.get("out_channels") != 3:
        raise ValueError(
            f"{source} describes a UNet with in_channels={unet_config.get('in_channels')} and "
            f"out_channels={unet_config.get('out_channels')}; pixel-space models need 3 and 3"
        )
    return unet_config, parsed["sampling_settings"], MODEL_TYPES[model_type]


# ---------------------------------------------------------------------------
# MODEL construction.


def build_model(state_dict: dict[str, torch.Tensor], unet_config: dict, sampling_settings: dict,
                model_type: comfy.model_base.ModelType, weight_dtype: torch.dtype | None,
                source: str) -> comfy.model_patcher.ModelPatcher:
    """Build a ModelPatcher the way comfy.sd.load_diffusion_model_state_dict does, without detection."""
    model_config = PixelDiffusionConfig(unet_config, sampling_settings, model_type)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()

    if weight_dtype is None:
        weight_dtype = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=comfy.utils.weight_dtype(state_dict),
        )
    manual_cast_dtype = comfy.model_management.unet_manual_cast(
        weight_dtype, load_device, model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(weight_dtype, manual_cast_dtype)

    try:
        model = model_config.get_model(state_dict, "")
    except (TypeError, ValueError, AssertionError, IndexError) as error:
        raise ValueError(f"{source}: ComfyUI's UNetModel rejected the stored unet_config: {error}") from error

    expected = set(model.diffusion_model.state_dict().keys())
    found = set(state_dict.keys())
    if expected != found:
        missing = sorted(expected - found)[:5]
        unexpected = sorted(found - expected)[:5]
        raise ValueError(
            f"{source}: weights do not match the stored unet_config (missing e.g. {missing}, "
            f"unexpected e.g. {unexpected}); the file is damaged or its metadata belongs to another model"
        )

    model = model.to(offload_device)
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_pixel_diffusion(path: Path, weight_dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """Load a pixel-diffusion safetensors file as a ComfyUI MODEL."""
    source = f"model file {path.name!r}"
    try:
        metadata = _read_metadata(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{source} could not be read as safetensors: {error}") from error
    unet_config, sampling_settings, model_type = parse_model_metadata(metadata, source)
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    return build_model(state_dict, unet_config, sampling_settings, model_type, weight_dtype, source)


def unconditional_conditioning() -> list:
    # The models ignore the conditioning tensor, so a one-element placeholder
    # only satisfies KSampler's required positive and negative inputs.
    return [[torch.zeros(1, 1, 1), {}]]


# ---------------------------------------------------------------------------
# Node.


class LOCOLoadDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LOCOLoadDiffusionModel",
            display_name="LOCO Load Pixel Diffusion Model",
            category="LOCO/models",
            description=(
                "Loads a small unconditional pixel-space diffusion model (epsilon or v prediction, ComfyUI UNet) whose "
                "configuration is stored in the file, as a MODEL. Lists the pack's embedded 32x32 digit models "
                "(pack/...) and compatible files in models/diffusion_models. Use it with VAELoader 'pixel_space' and a "
                "latent at image size: EmptyChromaRadianceLatentImage 32x32 (3 channels) or VAEEncode of 32x32 "
                "images. The conditioning output feeds KSampler's positive and negative inputs."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=model_files(),
                    tooltip="Model file: pack/<name> for the pack's embedded models, otherwise a path relative to "
                    "models/diffusion_models. Only files with loco-pixel-diffusion metadata are listed.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    default="default",
                    tooltip="Dtype of the UNet weights at inference. default: ComfyUI's choice for the device "
                    "(fp32 on CPU). fp32 suits Jacobian-based edits.",
                ),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip="Pixel-space diffusion MODEL (epsilon or v prediction, as stored), latents [B,3,H,W] in -1..1."),
                io.Conditioning.Output(
                    "conditioning", display_name="conditioning",
                    tooltip="Placeholder conditioning for KSampler's positive and negative inputs; the model is "
                    "unconditional and ignores it (CFG has no effect).",
                ),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}")
        path = resolve_model_path(model_name)
        model = load_pixel_diffusion(path, WEIGHT_DTYPES[weight_dtype])
        logger.info("loaded pixel diffusion model %s (%s)", model_name, model.model.get_dtype())
        return io.NodeOutput(model, unconditional_conditioning())


NODES = [LOCOLoadDiffusionModel]
