"""Nodes for the cross-model reproducibility study.

Several models start from identical noise and run the same deterministic
sampler, sigmas and CFG. Each model's own VAE decodes its samples. The
comparison reports RP (reproducibility score) for each pair of models and,
against training images, the memorized fraction and GL (generalization
score). The math is in
``loco_core.reproducibility``; this module is the ComfyUI glue.

Why a custom ``LOCO_NOISE`` type next to ComfyUI's ``NOISE``: ComfyUI's NOISE
objects (comfy_extras/nodes_custom_sampler.py) draw noise lazily from one seed
for the whole batch when a sampler asks, so a seed's noise depends on the
batch layout and there is no tensor to save or share. ``LOCO_NOISE`` is the
concrete ``[N, C, H, W]`` tensor with one seed per image, which the
comparison feeds to every model and which the save and load nodes write to
and read from safetensors files. The noise nodes also output it as a NOISE
object, so SamplerCustomAdvanced can sample single models from the same
tensor.
"""

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..loco_core import image_metrics, reproducibility_plots
from ..loco_core.reproducibility import (
    EMBEDDING_METRIC,
    SeedNoise,
    analyse_reproducibility,
    analysis_report,
    analysis_summary,
    check_deterministic_sampler,
    load_seed_noise,
    save_seed_noise,
    seed_noise,
)

logger = logging.getLogger(__name__)

CATEGORY = "LOCO/reproducibility"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SEED_COUNT = 4096
GRID_MAX_COLUMNS = 16
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRIC_CHOICES = ("ssim", "pixel_cosine", "mae", EMBEDDING_METRIC)
CLIP_VISION_BATCH = 32

LocoNoise = io.Custom("LOCO_NOISE")
LocoModelList = io.Custom("LOCO_MODEL_LIST")


# ---------------------------------------------------------------------------
# Shared noise as a ComfyUI NOISE object


class SharedSeedNoise:
    """ComfyUI NOISE object (``seed``, ``generate_noise(input_latent)``) that returns stored per-seed noise."""

    def __init__(self, noise: SeedNoise):
        self.noise = noise
        # SamplerCustomAdvanced hands ``seed`` to samplers that draw extra
        # noise; the first seed is the natural choice for a seed range.
        self.seed = noise.seeds[0]

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.noise.noise.shape):
            raise ValueError(
                f"the LOCO seed noise has shape {tuple(self.noise.noise.shape)} but the latent has "
                f"{tuple(samples.shape)}; use the noise node's empty_latent output or a latent of that shape"
            )
        return self.noise.noise.clone().to(samples.dtype)


def _noise_outputs(noise: SeedNoise) -> tuple[SeedNoise, SharedSeedNoise, dict]:
    latent = {"samples": torch.zeros_like(noise.noise)}
    return noise, SharedSeedNoise(noise), latent


_NOISE_OUTPUTS = [
    LocoNoise.Output(
        "noise", display_name="noise",
        tooltip="Starting noise [N, C, H, W] (float32, standard normal), one seed per image, for LOCO Compare Models.",
    ),
    io.Noise.Output(
        "comfy_noise", display_name="comfy_noise",
        tooltip="The same tensor as a ComfyUI NOISE for SamplerCustomAdvanced; the latent must have its shape.",
    ),
    io.Latent.Output(
        "empty_latent", display_name="empty_latent",
        tooltip="An all-zero latent of the noise's shape, to pair with comfy_noise in SamplerCustomAdvanced.",
    ),
]


# ---------------------------------------------------------------------------
# Files: paths confined to ComfyUI's input and output folders


def resolve_inside(base_dir: str, relative: str, what: str) -> Path:
    """Resolve ``relative`` under ``base_dir``; raise ValueError for absolute paths or paths that leave it."""
    relative = relative.strip()
    if not relative:
        raise ValueError(f"{what} is empty; give a path relative to {base_dir}")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"{what} {relative!r} must be a relative path inside {base_dir} without '..'")
    base = Path(base_dir).resolve()
    resolved = (base / candidate).resolve()
    # A symbolic link inside the folder could still point outside it.
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{what} {relative!r} resolves to {resolved}, outside {base}")
    return resolved


def _annotated_path(name: str, what: str) -> Path:
    # ComfyUI's convention: "file [output]" reads from the output folder,
    # "file [temp]" from the temp folder, anything else from the input folder.
    relative, base_dir = folder_paths.annotated_filepath(name.strip())
    return resolve_inside(base_dir or folder_paths.get_input_directory(), relative, what)


def _next_free_path(output_dir: str, prefix: str) -> Path:
    base = resolve_inside(output_dir, prefix + "_00001.safetensors", "filename_prefix")
    base.parent.mkdir(parents=True, exist_ok=True)
    stem = base.name[: -len("_00001.safetensors")]
    counter = 1
    while (base.parent / f"{stem}_{counter:05d}.safetensors").exists():
        counter += 1
    return base.parent / f"{stem}_{counter:05d}.safetensors"


# ---------------------------------------------------------------------------
# Noise nodes


class SeedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOSeedNoise",
            display_name="LOCO Seed Noise",
            category=CATEGORY,
            description=(
                "Draws the starting noise for a range of seeds on the CPU, one seeded generator per image, so seed k "
                "gets the same noise whatever the batch layout, device or machine. Seed k's noise equals what "
                "KSampler draws for seed k at batch size 1."
            ),
            inputs=[
                io.Int.Input("start_seed", default=0, min=0, max=MAX_SEED, tooltip="First seed of the range."),
                io.Int.Input(
                    "count", default=8, min=1, max=MAX_SEED_COUNT,
                    tooltip="Number of seeds (images): start_seed .. start_seed + count - 1.",
                ),
                io.Int.Input(
                    "latent_channels", default=4, min=1, max=128,
                    tooltip="Latent channels (4 for SD1.5/SDXL, 16 for SD3/Flux, 3 for pixel-space models). "
                    "Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "latent_height", default=64, min=1, max=16384,
                    tooltip="Latent height in latent pixels (image height / the VAE's downscale, 8 for SD). "
                    "Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "latent_width", default=64, min=1, max=16384,
                    tooltip="Latent width in latent pixels. Ignored when a latent is connected.",
                ),
                io.Latent.Input(
                    "latent", optional=True,
                    tooltip="Optional: take [C, H, W] from this latent (its batch size is not used).",
                ),
            ],
            outputs=list(_NOISE_OUTPUTS),
        )

    @classmethod
    def execute(cls, start_seed, count, latent_channels, latent_height, latent_width, latent=None) -> io.NodeOutput:
        if start_seed + count - 1 > MAX_SEED:
            raise ValueError(f"start_seed {start_seed} + count {count} runs past the largest seed {MAX_SEED}")
        if latent is not None:
            samples = latent["samples"]
            if samples.ndim != 4:
                raise ValueError(f"latent must be [B, C, H, W] (image models), got shape {tuple(samples.shape)}")
            shape = tuple(samples.shape[1:])
        else:
            shape = (latent_channels, latent_height, latent_width)
        noise = seed_noise(range(start_seed, start_seed + count), shape)
        return io.NodeOutput(*_noise_outputs(noise))


class SaveSeedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOSaveSeedNoise",
            display_name="LOCO Save Seed Noise",
            category=CATEGORY,
            description=(
                "Writes seed noise and its seeds to a new safetensors file in ComfyUI's output folder, so runs on "
                "other machines can load the identical tensor. Never overwrites: the name gets the next free counter."
            ),
            inputs=[
                LocoNoise.Input("noise", tooltip="Seed noise from LOCO Seed Noise or LOCO Load Seed Noise."),
                io.String.Input(
                    "filename_prefix", default="loco_noise/noise",
                    tooltip="Path inside the output folder without extension; '_00001.safetensors' is appended.",
                ),
            ],
            outputs=[
                io.String.Output(
                    "filename", display_name="filename",
                    tooltip="The saved file as LOCO Load Seed Noise reads it, e.g. 'loco_noise/noise_00001"
                    ".safetensors [output]'.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, noise, filename_prefix) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        while True:
            path = _next_free_path(output_dir, filename_prefix)
            try:
                save_seed_noise(noise, path)
                break
            except FileExistsError:
                # Another run took this name between the check and the write.
                continue
        relative = path.relative_to(Path(output_dir).resolve()).as_posix()
        annotated = f"{relative} [output]"
        logger.info("saved %d seeds of noise %s to %s", len(noise.seeds), noise.shape, path)
        return io.NodeOutput(annotated, ui=ui.PreviewText(annotated))


class LoadSeedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOLoadSeedNoise",
            display_name="LOCO Load Seed Noise",
            category=CATEGORY,
            description="Reads seed noise written by LOCO Save Seed Noise (safetensors with the seeds in its metadata).",
            inputs=[
                io.String.Input(
                    "filename", default="loco_noise/noise_00001.safetensors",
                    tooltip="Path relative to ComfyUI's input folder; end it with ' [output]' to read from the "
                    "output folder instead.",
                ),
            ],
            outputs=list(_NOISE_OUTPUTS),
        )

    @classmethod
    def fingerprint_inputs(cls, filename) -> Any:
        # Reload when the file changes, not only when the name does.
        try:
            stat = _annotated_path(filename, "filename").stat()
        except (OSError, ValueError):
            return filename
        return (filename, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, filename) -> io.NodeOutput:
        path = _annotated_path(filename, "filename")
        if not path.is_file():
            raise ValueError(f"seed-noise file {filename!r} not found at {path}")
        noise = load_seed_noise(path)
        return io.NodeOutput(*_noise_outputs(noise))


# ---------------------------------------------------------------------------
# The list of models to compare


@dataclass(frozen=True)
class ComparisonModel:
    """One model of a comparison with the VAE that decodes it and its conditioning."""

    label: str
    model: Any
    vae: Any
    positive: list | None
    negative: list | None


class ComparisonModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOComparisonModel",
            display_name="LOCO Comparison Model",
            category=CATEGORY,
            description=(
                "Adds a model, the VAE that decodes its latents and its conditioning to a list for LOCO Compare "
                "Models. Chain one node per model through the 'previous_models' input."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Diffusion model to sample."),
                io.Vae.Input("vae", tooltip="The VAE of this model's latent space (pixel_space for pixel models)."),
                io.String.Input(
                    "label", default="",
                    tooltip="Name in the report and pictures; empty gives 'model N' by position.",
                ),
                io.Conditioning.Input(
                    "positive", optional=True,
                    tooltip="Positive conditioning; leave unconnected for unconditional models.",
                ),
                io.Conditioning.Input(
                    "negative", optional=True,
                    tooltip="Negative conditioning; unconnected means the positive one (or none for unconditional).",
                ),
                LocoModelList.Input(
                    "previous_models", optional=True,
                    tooltip="The list built so far; this node appends to a copy of it.",
                ),
            ],
            outputs=[LocoModelList.Output("models", display_name="models", tooltip="The list with this model appended.")],
        )

    @classmethod
    def execute(cls, model, vae, label, positive=None, negative=None, previous_models=None) -> io.NodeOutput:
        previous = tuple(previous_models or ())
        label = label.strip() or f"model {len(previous) + 1}"
        if negative is not None and positive is None:
            raise ValueError(f"{label}: negative conditioning is connected but positive is not; connect both")
        entry = ComparisonModel(label, model, vae, positive, negative)
        return io.NodeOutput(previous + (entry,))


# ---------------------------------------------------------------------------
# Sampling and decoding


@dataclass(frozen=True)
class SamplingSettings:
    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    batch_size: int
    sigmas: torch.Tensor | None
    batch_invariant: bool = False


def _conditioning(entry: ComparisonModel) -> tuple[list, list]:
    # ComfyUI's convert_cond skips a None tensor, so [[None, {}]] reaches the
    # model without cross-attention context: the unconditional case.
    unconditional = [[None, {}]]
    positive = entry.positive if entry.positive is not None else unconditional
    negative = entry.negative if entry.negative is not None else positive
    return positive, negative


def _check_latent_shape(entry: ComparisonModel, noise: SeedNoise) -> None:
    latent_format = entry.model.get_model_object("latent_format")
    if getattr(latent_format, "latent_dimensions", 2) != 2:
        raise ValueError(f"{entry.label}: only image models are supported, this model has video latents")
    channels = latent_format.latent_channels
    if channels != noise.shape[0]:
        raise ValueError(
            f"{entry.label} has {channels}-channel latents but the noise has {noise.shape[0]} channels; every model "
            "must share the noise's latent shape (make the noise with that channel count or compare other models)"
        )


def _model_sigmas(entry: ComparisonModel, settings: SamplingSettings) -> torch.Tensor:
    if settings.sigmas is not None:
        return settings.sigmas.detach().to("cpu", torch.float32).clone()
    # The same schedule KSampler computes, including the samplers that drop
    # the penultimate sigma.
    ksampler = comfy.samplers.KSampler(
        entry.model,
        steps=settings.steps,
        device="cpu",
        sampler=settings.sampler_name,
        scheduler=settings.scheduler,
        denoise=1.0,
        model_options=entry.model.model_options,
    )
    return ksampler.sigmas.detach().to("cpu", torch.float32).clone()


def _interrupt_callback(step, denoised, x, total_steps) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def _decode(entry: ComparisonModel, samples: torch.Tensor) -> torch.Tensor:
    images = entry.vae.decode(samples)
    if images.ndim != 4:
        raise ValueError(f"{entry.label}: the VAE decoded to shape {tuple(images.shape)}; expected [B, H, W, C] images")
    return images[..., :3].movedim(-1, 1).to("cpu", torch.float32).clamp(0.0, 1.0)


def _batch_row(value: Any, row: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[row : row + 1]
    return value


def _one_row_at_a_time(apply_model, args: dict) -> torch.Tensor:
    """Model function wrapper that evaluates the batch row by row.

    Batched CPU and GPU kernels may sum in another order than the same
    kernel on one row, so a seed's result would depend on its neighbours in
    the batch. One row per call makes every seed's arithmetic the same
    whatever batch_size is, and, since cond and uncond rows are split too,
    whatever the CFG batching.
    """
    x, timestep, conditions = args["input"], args["timestep"], args["c"]
    if conditions.get("control") is not None:
        raise ValueError(
            "batch_invariant does not cover ControlNet conditioning, whose control signal is computed for the "
            "whole batch; turn batch_invariant off or remove the ControlNet"
        )

    batch = x.shape[0]
    rows = []
    for row in range(batch):
        row_conditions = {key: _batch_row(value, row, batch) for key, value in conditions.items()}
        rows.append(apply_model(x[row : row + 1], timestep[row : row + 1], **row_conditions))
    return torch.cat(rows)


def _sampling_model(entry: ComparisonModel, settings: SamplingSettings):
    """Return the model to sample: the entry's own, or a clone that runs one batch row at a time."""
    if not settings.batch_invariant:
        return entry.model
    if "model_function_wrapper" in entry.model.model_options:
        raise ValueError(
            f"{entry.label}: the model already has a model function wrapper (set by another node), which "
            "batch_invariant cannot split by rows; turn batch_invariant off for this comparison"
        )
    model = entry.model.clone()
    model.set_model_unet_function_wrapper(_one_row_at_a_time)
    return model


def _decode_chunk(entry: ComparisonModel, samples: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    if not settings.batch_invariant:
        return _decode(entry, samples)
    return torch.cat([_decode(entry, samples[row : row + 1]) for row in range(samples.shape[0])])


def sample_model(
    entry: ComparisonModel,
    noise: SeedNoise,
    settings: SamplingSettings,
    sigmas: torch.Tensor,
    progress: comfy.utils.ProgressBar,
) -> torch.Tensor:
    """Sample one model from the shared noise in batches of seeds and decode; returns images ``[S, 3, H, W]``."""
    positive, negative = _conditioning(entry)
    model = _sampling_model(entry, settings)
    decoded = []
    for start in range(0, len(noise.seeds), settings.batch_size):
        comfy.model_management.throw_exception_if_processing_interrupted()
        chunk = noise.select(start, start + settings.batch_size)
        latent_image = torch.zeros_like(chunk.noise)
        samples = comfy.sample.sample(
            model,
            chunk.noise,
            settings.steps,
            settings.cfg,
            settings.sampler_name,
            settings.scheduler,
            positive,
            negative,
            latent_image,
            denoise=1.0,
            sigmas=sigmas.clone(),
            callback=_interrupt_callback,
            disable_pbar=True,
            seed=chunk.seeds[0],
        )
        decoded.append(_decode_chunk(entry, samples, settings))
        progress.update(len(chunk.seeds))
    return torch.cat(decoded)


# ---------------------------------------------------------------------------
# Training images and embeddings


def _image_batch_to_chw(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be an IMAGE [B, H, W, C], got shape {tuple(images.shape)}")
    rgb = images[..., :3] if images.shape[-1] >= 3 else images.expand(-1, -1, -1, 3)
    return rgb.movedim(-1, 1).to("cpu", torch.float32).clone()


def load_image_folder(folder: str) -> torch.Tensor:
    """Load every image in a folder under ComfyUI's input folder (sorted by name) as ``[M, 3, H, W]``."""
    path = resolve_inside(folder_paths.get_input_directory(), folder, "training_folder")
    if not path.is_dir():
        raise ValueError(f"training_folder {folder!r} is not a folder inside the input folder ({path})")
    files = sorted(item for item in path.iterdir() if item.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"training_folder {folder!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}); add images or fix the path")
    images = []
    for file in files:
        with Image.open(file) as picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array.copy()).movedim(-1, 0))
    sizes = {tuple(image.shape[1:]) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"training_folder {folder!r} mixes image sizes {sorted(sizes)}; use one size")
    return torch.stack(images)


def _training_images(training_images, training_folder: str) -> tuple[torch.Tensor | None, str]:
    folder = (training_folder or "").strip()
    if training_images is not None and folder:
        raise ValueError("connect training_images or set training_folder, not both")
    if training_images is not None:
        return _image_batch_to_chw(training_images, "training_images"), "training_images input"
    if folder:
        return load_image_folder(folder), f"input folder {folder}"
    return None, "none"


def _embed(clip_vision, images: torch.Tensor) -> torch.Tensor:
    embeddings = []
    for start in range(0, images.shape[0], CLIP_VISION_BATCH):
        comfy.model_management.throw_exception_if_processing_interrupted()
        batch = images[start : start + CLIP_VISION_BATCH].movedim(1, -1)
        embeddings.append(clip_vision.encode_image(batch).image_embeds.detach().to("cpu", torch.float32))
    return torch.cat(embeddings)


# ---------------------------------------------------------------------------
# Run metadata


def _comfyui_version() -> str:
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "unknown"


def _attention_backend() -> str:
    import comfy.ldm.modules.attention as attention

    return getattr(attention.optimized_attention, "__name__", str(attention.optimized_attention))


def _run_settings(models, noise, settings, sigmas_per_model, comparison_size, resized, training_source, training):
    sigma_lists = {entry.label: [round(float(value), 6) for value in sigmas] for entry, sigmas in zip(models, sigmas_per_model)}
    first = sigmas_per_model[0]
    return {
        "sampler": settings.sampler_name,
        "scheduler": settings.scheduler if settings.sigmas is None else "SIGMAS input",
        "steps": len(first) - 1,
        "cfg": settings.cfg,
        "denoise": 1.0,
        "batch_size": settings.batch_size,
        "batch_invariant": settings.batch_invariant,
        "sigmas": sigma_lists,
        "sigmas_identical": all(torch.equal(first, sigmas) for sigmas in sigmas_per_model),
        "noise_shape": list(noise.shape),
        "noise_dtype": str(noise.noise.dtype),
        "noise_device": "cpu",
        "model_dtypes": {entry.label: str(entry.model.model_dtype()) for entry in models},
        "vae_dtypes": {entry.label: str(getattr(entry.vae, "vae_dtype", "unknown")) for entry in models},
        "conditioning": {
            entry.label: "connected" if entry.positive is not None else "unconditional" for entry in models
        },
        "device": str(comfy.model_management.get_torch_device()),
        "attention_backend": _attention_backend(),
        "torch_version": torch.__version__,
        "comfyui_version": _comfyui_version(),
        "comparison_size": list(comparison_size),
        "resized_to_comparison_size": resized,
        "training_images": {"source": training_source, "count": 0 if training is None else int(training.shape[0])},
    }


# ---------------------------------------------------------------------------
# The comparison node


class CompareModelsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOCompareModels",
            display_name="LOCO Compare Models",
            category=CATEGORY,
            description=(
                "Samples every model from the identical seed noise with the same deterministic sampler, sigmas and "
                "CFG, decodes each with its own VAE and measures reproducibility: per-seed similarity (SSIM, "
                "centred pixel cosine, 1 - MAE, and CLIP vision embedding cosine when connected), a threshold "
                "calibrated on mismatched-seed pairs with its ROC-AUC, RP per model pair, and with training images "
                "the nearest training image of each sample, the memorized fraction and GL."
            ),
            inputs=[
                LocoModelList.Input("models", tooltip="Two or more models from chained LOCO Comparison Model nodes."),
                LocoNoise.Input("noise", tooltip="Seed noise (at least 2 seeds) shared by every model."),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                    tooltip="Sampler for every model; only deterministic samplers are accepted (no ancestral, SDE, "
                    "DDPM or LCM).",
                ),
                io.Combo.Input(
                    "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                    tooltip="Scheduler that makes the sigmas for every model (ignored when sigmas is connected).",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance scale; 1 runs the positive conditioning only.",
                ),
                io.Int.Input(
                    "batch_size", default=4, min=1, max=MAX_SEED_COUNT,
                    tooltip="Seeds per sampler call. The noise does not depend on it; the results agree up to float "
                    "rounding of batched kernels, or bit for bit with batch_invariant. The interrupt is checked "
                    "every sampler step.",
                ),
                io.Combo.Input(
                    "metric", options=list(METRIC_CHOICES), default="ssim",
                    tooltip="Metric shown in the pictures and summary (the report has all): ssim (-1..1), "
                    "pixel_cosine (-1..1, mean-centred), mae (1 - mean absolute error, 0..1), embedding_cosine "
                    "(CLIP vision, needs clip_vision).",
                ),
                io.Float.Input(
                    "null_quantile", default=0.99, min=0.5, max=0.9999, step=0.001, round=0.0001,
                    tooltip="Quantile of the mismatched-seed similarities used as threshold (0.99: 1% false "
                    "positives); also used for the memorization null.",
                ),
                io.Combo.Input(
                    "memorization_threshold_mode", options=["calibrate", "fixed"], default="calibrate",
                    tooltip="calibrate: null_quantile of training images' similarity to their nearest other "
                    "training image; fixed: memorization_threshold for the shown metric.",
                ),
                io.Float.Input(
                    "memorization_threshold", default=0.9, min=-1.0, max=1.0, step=0.01, round=0.0001,
                    tooltip="Fixed memorization threshold in the shown metric's units (used in fixed mode only).",
                ),
                io.Sigmas.Input(
                    "sigmas", optional=True,
                    tooltip="Optional sigma schedule for every model, replacing scheduler and steps.",
                ),
                io.Boolean.Input(
                    "batch_invariant", default=False, optional=True,
                    tooltip="Run the model and the VAE one sample at a time inside each batch, so every seed's "
                    "result is bit-identical whatever batch_size. Slower on GPUs; not with ControlNet conditioning.",
                ),
                io.ClipVision.Input(
                    "clip_vision", optional=True,
                    tooltip="Optional CLIP vision model: adds the embedding_cosine metric (image_embeds).",
                ),
                io.Image.Input(
                    "training_images", optional=True,
                    tooltip="Optional training images (IMAGE batch) for nearest-neighbour memorization scores.",
                ),
                io.String.Input(
                    "training_folder", default="", optional=True,
                    tooltip="Optional folder of training images inside ComfyUI's input folder (instead of "
                    "training_images).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    "paired_grid", display_name="paired_grid",
                    tooltip=f"One row per model (and its nearest training images), one column per seed (first "
                    f"{GRID_MAX_COLUMNS} seeds).",
                ),
                io.Image.Output("rp_heatmap", display_name="rp_heatmap", tooltip="RP between every pair of models for the shown metric."),
                io.Image.Output(
                    "histogram", display_name="histogram", tooltip="Matched against mismatched seed similarities with the threshold.",
                ),
                io.Image.Output(
                    "samples", display_name="samples", tooltip="All decoded samples at comparison size, model by model, seeds in order.",
                ),
                io.String.Output("report_json", display_name="report_json", tooltip="Full report: settings, versions, per-seed scores."),
                io.String.Output("summary", display_name="summary", tooltip="A few lines of text on the shown metric."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        models,
        noise,
        sampler_name,
        scheduler,
        steps,
        cfg,
        batch_size,
        metric,
        null_quantile,
        memorization_threshold_mode,
        memorization_threshold,
        sigmas=None,
        batch_invariant=False,
        clip_vision=None,
        training_images=None,
        training_folder="",
    ) -> io.NodeOutput:
        models = tuple(models)
        _check_request(models, noise, sampler_name, metric, clip_vision, sigmas)
        settings = SamplingSettings(sampler_name, scheduler, steps, cfg, batch_size, sigmas, bool(batch_invariant))
        for entry in models:
            _check_latent_shape(entry, noise)
        training, training_source = _training_images(training_images, training_folder)
        if memorization_threshold_mode == "fixed" and training is None:
            raise ValueError("memorization_threshold_mode is 'fixed' but no training images are connected")

        sigmas_per_model = [_model_sigmas(entry, settings) for entry in models]
        progress = comfy.utils.ProgressBar(len(noise.seeds) * len(models))
        decoded = [
            sample_model(entry, noise, settings, sigmas, progress) for entry, sigmas in zip(models, sigmas_per_model)
        ]

        height, width = decoded[0].shape[-2:]
        resized = [entry.label for entry, images in zip(models, decoded) if images.shape[-2:] != (height, width)]
        if resized:
            logger.info("resized the samples of %s to %dx%d for comparison", ", ".join(resized), height, width)
        decoded = [image_metrics.resize_images(images, height, width) for images in decoded]
        if training is not None:
            training = image_metrics.resize_images(training, height, width)

        items, training_items = _metric_items(decoded, training, clip_vision)
        fixed = {metric: memorization_threshold} if memorization_threshold_mode == "fixed" else None
        analysis = analyse_reproducibility(items, training_items, null_quantile, fixed)

        labels = [entry.label for entry in models]
        report = analysis_report(analysis, labels, noise.seeds)
        report["settings"] = _run_settings(
            models, noise, settings, sigmas_per_model, (height, width), resized, training_source, training
        )
        report["shown_metric"] = metric
        summary = analysis_summary(analysis, labels, metric)
        pictures = _pictures(analysis, labels, noise.seeds, decoded, training, metric)
        samples_image = torch.cat(decoded).movedim(1, -1)
        return io.NodeOutput(
            *pictures, samples_image, json.dumps(report, indent=2), summary, ui=ui.PreviewText(summary)
        )


def _check_request(models, noise, sampler_name, metric, clip_vision, sigmas) -> None:
    check_deterministic_sampler(sampler_name)
    if len(models) < 2:
        raise ValueError(f"compare at least 2 models, got {len(models)}; chain more LOCO Comparison Model nodes")
    labels = [entry.label for entry in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}; set the label of each LOCO Comparison Model")
    if len(noise.seeds) < 2:
        raise ValueError("the noise needs at least 2 seeds: mismatched-seed pairs calibrate the threshold")
    if metric == EMBEDDING_METRIC and clip_vision is None:
        raise ValueError("metric 'embedding_cosine' needs a CLIP vision model on the clip_vision input")
    if sigmas is not None and (sigmas.ndim != 1 or sigmas.numel() < 2):
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 values, got shape {tuple(sigmas.shape)}")


def _metric_items(decoded, training, clip_vision):
    items = {name: decoded for name in image_metrics.PIXEL_METRICS}
    training_items = None if training is None else {name: training for name in image_metrics.PIXEL_METRICS}
    if clip_vision is not None:
        items[EMBEDDING_METRIC] = [_embed(clip_vision, images) for images in decoded]
        if training_items is not None:
            training_items[EMBEDDING_METRIC] = _embed(clip_vision, training)
    return items, training_items


def _pictures(analysis, labels, seeds, decoded, training, metric):
    comparison = analysis.comparisons[metric]
    columns = min(len(seeds), GRID_MAX_COLUMNS)
    rows, row_labels = [], []
    for index, (label, images) in enumerate(zip(labels, decoded)):
        rows.append(images[:columns])
        row_labels.append(label)
        if metric in analysis.memorization:
            nearest = analysis.memorization[metric][index].nearest_index[:columns]
            rows.append(training[nearest])
            row_labels.append(f"{label}: nearest training")
    grid = reproducibility_plots.render_image_grid(rows, row_labels, [f"seed {seed}" for seed in seeds[:columns]])

    heatmap = reproducibility_plots.render_heatmap(
        comparison.rp_matrix,
        labels,
        f"RP, {metric} > {comparison.threshold:.3f} (AUC {comparison.roc_auc:.3f})",
    )
    histogram = reproducibility_plots.render_histogram(
        torch.cat(list(comparison.matched.values())),
        comparison.mismatched,
        comparison.threshold,
        f"{metric}: matched vs mismatched seeds, ROC-AUC {comparison.roc_auc:.3f}",
    )
    return grid, heatmap, histogram


NODES = [SeedNoiseNode, SaveSeedNoiseNode, LoadSeedNoiseNode, ComparisonModelNode, CompareModelsNode]
