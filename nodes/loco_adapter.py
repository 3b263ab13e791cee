"""The one bridge between a ComfyUI MODEL and the loco_core denoiser contract.

A MODEL plus positive and negative CONDITIONING plus a CFG scale becomes a
callable D(x, sigma) that returns the denoised x0 prediction exactly as
KSampler computes it. The callable is ComfyUI's own CFGGuider seen from inside
a sampler, so CFG, model patches, wrappers, LoRA and ControlNet all apply. ``run_with_denoiser`` runs a task while that callable is valid.

The task works in model space: ComfyUI's ``process_latent_in`` has already
scaled the latent, and for every model family x0 is the denoised output.
Epsilon, v and EDM models see x = x0 + sigma * noise; flow models see
x = (1 - sigma) x0 + sigma * noise, and the same Euler step of the ODE applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.samplers

from ..loco_core import LocoError, saveable_weights

logger = logging.getLogger(__name__)


@dataclass
class ModelSpace:
    """Task input: the latent in model space, the two denoisers and the model's noise schedule."""

    latent: torch.Tensor
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    differentiable_denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    model_sampling: object

    def sigma_at(self, t: float) -> float:
        """Sigma at diffusion time fraction t in (0, 1] (t = 1 is pure noise)."""
        return float(self.model_sampling.percent_to_sigma(1.0 - t))


Task = Callable[[ModelSpace], object]


def differentiable_attention(func, *args, **kwargs):
    """Attention override for Jacobian passes.

    ComfyUI's default CPU attention (sub-quadratic, chunked) writes with an
    ``out=`` op that autograd cannot follow, and the fused SDPA kernels on
    GPUs have no forward-mode AD. The split implementation uses plain
    matrix products and softmax, which support forward and reverse mode.
    """
    return comfy.ldm.modules.attention.attention_split(*args, **kwargs)


class _TaskSampler(comfy.samplers.Sampler):
    """A sampler that runs a task with ComfyUI's denoiser instead of sampling."""

    def __init__(self, task: Task):
        self.task = task
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        # The guider cloned model_options for this run, so adding the
        # attention override to a copy of it leaves the user's model as it was.
        differentiable_args = dict(extra_args)
        options = comfy.model_patcher.create_model_options_clone(extra_args["model_options"])
        options.setdefault("transformer_options", {})["optimized_attention_override"] = differentiable_attention
        differentiable_args["model_options"] = options

        def denoise(x, sigma):
            return model_wrap(x, sigma, **extra_args)

        def differentiable_denoise(x, sigma):
            return model_wrap(x, sigma, **differentiable_args)

        space = ModelSpace(latent_image, denoise, differentiable_denoise, model_wrap.inner_model.model_sampling)
        self.result = self.task(space)
        return latent_image


def _detach_weight(weight: torch.Tensor) -> torch.Tensor:
    # ComfyUI copies a weight before calling wrappers, and the copy is made
    # outside inference mode during a Jacobian pass, so autograd can save it.
    return weight.detach()


def reverse_mode_clone(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """Clone the MODEL so that its layers use per-call copies of their weights.

    ComfyUI creates checkpoint weights inside inference mode, and reverse mode
    cannot save inference tensors. A weight wrapper on every ComfyUI layer
    makes each forward pass use a transient copy instead, the mechanism of
    ComfyUI's own LoRA trainer. The user's MODEL is not modified.
    """
    clone = model.clone()
    for name, module in clone.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attribute in ("weight", "bias"):
            if getattr(module, attribute, None) is not None:
                clone.add_weight_wrapper(f"{name}.{attribute}", _detach_weight)
    return clone


def run_with_denoiser(
    model: comfy.model_patcher.ModelPatcher,
    positive,
    negative,
    cfg: float,
    latent: torch.Tensor,
    sigmas: torch.Tensor,
    task: Task,
    reverse_mode: bool = False,
    seed: int = 0,
):
    """Run ``task`` with the denoiser of ``model`` and return what the task returns.

    ``latent`` is a node-level LATENT tensor [B, C, H, W], and the task
    receives it in model space. ``sigmas`` should be the schedule the task walks, because
    some model patches read it.
    """
    patcher = reverse_mode_clone(model) if reverse_mode else model
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    sampler = _TaskSampler(task)
    noise = torch.zeros_like(latent)
    guider.sample(noise, latent, sampler, sigmas.float(), disable_pbar=True, seed=seed)
    return sampler.result


def decoded_shape(vae, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the shape [B, C, H, W] that ``vae`` decodes from a latent of ``latent_shape``."""
    if getattr(vae, "latent_dim", 2) != 2 or len(latent_shape) != 4:
        raise LocoError("mask_space 'decoded image' supports image VAEs only; use mask_space 'latent' for this model")
    batch, channels, height, width = latent_shape
    if vae.latent_channels != channels:
        raise LocoError(
            f"the vae decodes latents of {vae.latent_channels} channels but the model's latent has {channels}; "
            "connect the VAE that belongs to the model"
        )
    factor = vae.spacial_compression_decode()
    return (batch, vae.output_channels, height * factor, width * factor)


def decoded_denoiser(model: comfy.model_patcher.ModelPatcher, vae, denoise):
    """Wrap ``denoise`` so that it returns the x0 prediction decoded by the VAE: x -> decode(D(x)).

    The wrapper returns the decoder's raw output, in its own range (about
    -1..1 for Stable Diffusion) and without the clamp that VAEDecode applies,
    because the clamp would zero the derivative of every saturated pixel.
    """

    def decode_prediction(x, sigma):
        latent = model.model.process_latent_out(denoise(x, sigma))
        image = vae.first_stage_model.decode(latent.to(device=vae.device, dtype=vae.vae_dtype))
        return image.to(device=x.device, dtype=torch.float32)

    return decode_prediction


@contextlib.contextmanager
def decoder_for_jacobian(vae):
    """Load the VAE beside the running model and let reverse mode run through its weights.

    Its inference-tensor weights are swapped for ordinary copies while the
    block runs (one extra copy of the decoder's weights) and restored after.
    """
    # NOTE: only run on the CPU so far. On a GPU with little free memory,
    # loading the VAE here may offload part of the diffusion model.
    comfy.model_management.load_models_gpu([vae.patcher])
    with saveable_weights(vae.first_stage_model):
        yield


def model_space_to_latent(model: comfy.model_patcher.ModelPatcher, samples: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(samples)


def model_fingerprint(model: comfy.model_patcher.ModelPatcher) -> str:
    """Return a short id of the model's architecture, weights and patches.

    It hashes the model class, its UNet configuration, the patched weight
    keys and the norms of a few parameters, enough to notice directions
    applied to a different model without reading every weight.
    """
    inner = model.model
    config = getattr(getattr(inner, "model_config", None), "unet_config", {}) or {}
    parameters = list(inner.diffusion_model.parameters()) if hasattr(inner, "diffusion_model") else []
    probes = [parameters[i] for i in sorted({0, len(parameters) // 2, len(parameters) - 1}) if parameters]
    norms = [round(float(p.detach().float().norm()), 4) for p in probes]
    description = {
        "class": type(inner).__name__,
        "unet_config": json.dumps(config, sort_keys=True, default=str),
        "patches": sorted(model.patches.keys()) if hasattr(model, "patches") else [],
        "norms": norms,
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    return f"{type(inner).__name__}:{digest[:16]}"
