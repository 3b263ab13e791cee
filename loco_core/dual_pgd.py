"""Dual-perturbation projected gradient descent (PGD) against image classifiers.

The image is split into a salient foreground (mask M) and the background
(1 - M). The perturbation is delta = delta_F + delta_B with a small budget
on the foreground and a larger one on the background:

    ||delta_F|| <= eps_F on M,   ||delta_B|| <= eps_B on 1 - M,   x + delta in [0, 1]

in the L-inf or the L2 norm. Budgets and step sizes are in pixel units of
images scaled to 0..1 (8/255 = 0.0314). Each step ascends

    loss(f(x + delta), y) - lambda * background_salience_share(x + delta)

where loss is the cross-entropy of the true label (untargeted) or minus the
cross-entropy of the target label (targeted), and the salience term keeps
the background inconspicuous when lambda > 0. Per region, L-inf takes a
signed gradient step and clips to the box. L2 masks the gradient to the
region before normalising it, steps, and scales the region's perturbation
by min(1, eps / norm). After every step the image is clipped to [0, 1].
Restarts begin at random points inside each budget; the best restart is
kept per image. Against a noise-smoothed classifier the gradient is
averaged over several noise draws (expectation over transformation, EOT),
and success is judged by the classifier's majority vote.

The mask is binarised at 0.5 so the two regions partition the pixels; it
applies to all channels.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .salience import background_salience_share, spectral_residual_salience

logger = logging.getLogger(__name__)

NORMS = ("linf", "l2")

# Default step size as a multiple of budget / steps. With 2.5 the steps of
# one run add up to 2.5 budgets, so a run can cross its ball and come back.
STEP_SIZE_FACTOR = 2.5

_NORM_EPS = 1e-12


@dataclass(frozen=True)
class DualPGDConfig:
    """Settings of one dual-perturbation PGD run. Budgets and steps are in pixel units of 0..1 images."""

    eps_foreground: float
    eps_background: float
    norm: str = "linf"
    steps: int = 40
    step_foreground: float | None = None
    step_background: float | None = None
    restarts: int = 1
    random_start: bool = True
    targeted: bool = False
    eot_draws: int = 1
    salience_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("eps_foreground", "eps_background"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            if self.norm == "linf" and value > 1:
                raise ValueError(f"{name} is an L-inf budget for 0..1 images and must be <= 1, got {value}")
        for name in ("step_foreground", "step_background"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be >= 0 or None for the default, got {value}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        if self.eot_draws < 1:
            raise ValueError(f"eot_draws must be >= 1, got {self.eot_draws}")
        if not math.isfinite(self.salience_weight) or self.salience_weight < 0:
            raise ValueError(f"salience_weight must be >= 0, got {self.salience_weight}")

    def step_sizes(self) -> tuple[float, float]:
        """Return the (foreground, background) step sizes, filling defaults of 2.5 * eps / steps."""
        step_fg = self.step_foreground
        step_bg = self.step_background
        if step_fg is None:
            step_fg = STEP_SIZE_FACTOR * self.eps_foreground / self.steps
        if step_bg is None:
            step_bg = STEP_SIZE_FACTOR * self.eps_background / self.steps
        return step_fg, step_bg


@dataclass
class PGDStep:
    """State after one PGD step, passed to the per-step callback.

    ``step`` is 0 for the starting point of a restart and 1..steps after each
    update. The tensors are ``[B, C, H, W]`` and must not be modified.
    """

    restart: int
    step: int
    total_steps: int
    adversarial: torch.Tensor
    delta_foreground: torch.Tensor
    delta_background: torch.Tensor


@dataclass
class DualPGDResult:
    """Outcome of an attack on a batch; every tensor has the batch as its first dimension."""

    adversarial: torch.Tensor
    delta_foreground: torch.Tensor
    delta_background: torch.Tensor
    foreground: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None
    success: torch.Tensor
    clean_prediction: torch.Tensor
    clean_confidence: torch.Tensor
    adversarial_prediction: torch.Tensor
    adversarial_confidence: torch.Tensor
    norms: dict[str, torch.Tensor]
    background_salience_clean: torch.Tensor
    background_salience_adversarial: torch.Tensor
    config: DualPGDConfig
    extra: dict = field(default_factory=dict)

    def per_image(self) -> list[dict]:
        """Return one plain-Python record per image (JSON-serialisable)."""
        records = []
        for i in range(self.adversarial.shape[0]):
            record = {
                "index": i,
                "label": int(self.labels[i]),
                "target": None if self.targets is None else int(self.targets[i]),
                "success": bool(self.success[i]),
                "clean_prediction": int(self.clean_prediction[i]),
                "clean_confidence": float(self.clean_confidence[i]),
                "adversarial_prediction": int(self.adversarial_prediction[i]),
                "adversarial_confidence": float(self.adversarial_confidence[i]),
                "foreground_fraction": float(self.foreground[i].mean()),
                "background_salience_share_clean": float(self.background_salience_clean[i]),
                "background_salience_share_adversarial": float(self.background_salience_adversarial[i]),
            }
            for name, values in self.norms.items():
                record[name] = float(values[i])
            records.append(record)
        return records

    def summary(self) -> dict:
        """Return batch-level figures: success rate and mean region norms."""
        summary = {
            "images": int(self.adversarial.shape[0]),
            "success_rate": float(self.success.float().mean()),
            "clean_accuracy": float((self.clean_prediction == self.labels).float().mean()),
        }
        for name, values in self.norms.items():
            summary[f"mean_{name}"] = float(values.mean())
        return summary


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return the foreground as 0/1 floats (values >= 0.5 are foreground)."""
    return (mask >= 0.5).to(torch.float32)


def region_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-image L-inf and L2 norms of a ``[B, C, H, W]`` perturbation."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1), flat.norm(dim=1)


def project_linf(delta: torch.Tensor, eps: float, region: torch.Tensor) -> torch.Tensor:
    """Restrict ``delta`` to the region and clip it to the L-inf ball of radius eps."""
    return delta.clamp(-eps, eps) * region


def project_l2(delta: torch.Tensor, eps: float, region: torch.Tensor) -> torch.Tensor:
    """Restrict ``delta`` to the region and scale each image's part by min(1, eps / ||delta||_2)."""
    delta = delta * region
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    scale = torch.clamp(eps / norms.clamp_min(_NORM_EPS), max=1.0)
    return delta * scale


def random_start(
    images: torch.Tensor, eps: float, region: torch.Tensor, norm: str, generator: torch.Generator
) -> torch.Tensor:
    """Draw a random perturbation uniformly inside the region's ball (region is ``[B, 1, H, W]``)."""
    shape = images.shape
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return ((2 * noise - 1) * eps).to(images.device, images.dtype) * region

    # Uniform in an L2 ball of dimension d: Gaussian direction, radius eps * U^(1/d).
    direction = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    direction = direction.to(images.device, images.dtype) * region
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(_NORM_EPS).view(-1, 1, 1, 1)
    dims = (region.flatten(1).sum(dim=1) * shape[1]).clamp_min(1.0)
    uniform = torch.rand(shape[0], generator=generator, device=generator.device, dtype=torch.float32)
    radius = eps * uniform.to(images.device, images.dtype) ** (1.0 / dims)
    return direction * radius.view(-1, 1, 1, 1)


def linf_step(delta: torch.Tensor, grad: torch.Tensor, step: float, eps: float, region: torch.Tensor) -> torch.Tensor:
    """Take one signed-gradient step on the region and clip to its L-inf ball."""
    return project_linf(delta + step * torch.sign(grad * region), eps, region)


def l2_step(delta: torch.Tensor, grad: torch.Tensor, step: float, eps: float, region: torch.Tensor) -> torch.Tensor:
    """Take one normalised-gradient step on the region and project onto its L2 ball.

    The gradient is masked to the region before normalising, so the step on
    one region does not depend on the gradient in the other.
    """
    region_grad = grad * region
    grad_norm = region_grad.flatten(1).norm(dim=1).clamp_min(_NORM_EPS).view(-1, 1, 1, 1)
    return project_l2(delta + step * region_grad / grad_norm, eps, region)


def _has_noise(classifier: nn.Module) -> bool:
    return float(getattr(classifier, "noise_sigma", 0.0)) > 0


def class_scores(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return ``[B, K]`` class scores: softmax probabilities, or vote shares for a smoothed classifier.

    A classifier that defines ``class_scores`` (the noise-smoothed wrapper in
    ``loco_core.classifiers``) decides by its own seeded majority vote.
    """
    with torch.no_grad():
        if hasattr(classifier, "class_scores"):
            return classifier.class_scores(images)
        return F.softmax(classifier(images).float(), dim=1)


def _attack_loss(
    classifier: nn.Module,
    adversarial: torch.Tensor,
    classes: torch.Tensor,
    foreground: torch.Tensor,
    config: DualPGDConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return the summed objective to ascend (one term per image)."""
    batch = adversarial.shape[0]
    if _has_noise(classifier):
        # EOT: all noise draws of the batch in one forward pass, averaged.
        repeated = adversarial.repeat(config.eot_draws, 1, 1, 1)
        logits = classifier(repeated, generator=generator)
        losses = F.cross_entropy(logits.float(), classes.repeat(config.eot_draws), reduction="none")
        losses = losses.view(config.eot_draws, batch).mean(dim=0)
    else:
        logits = classifier(adversarial)
        losses = F.cross_entropy(logits.float(), classes, reduction="none")

    objective = -losses if config.targeted else losses
    if config.salience_weight > 0:
        salience = spectral_residual_salience(adversarial)
        objective = objective - config.salience_weight * background_salience_share(salience, foreground)
    return objective.sum()


def _run_restart(
    classifier: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    foreground: torch.Tensor,
    config: DualPGDConfig,
    restart: int,
    generator: torch.Generator,
    callback: Callable[[PGDStep], None] | None,
) -> torch.Tensor:
    """Run one PGD restart and return the final adversarial images."""
    region_fg = foreground.unsqueeze(1)
    region_bg = 1.0 - region_fg
    step_fg, step_bg = config.step_sizes()

    # With a 0/1 mask the two L-inf region steps add up to one signed step
    # with a per-pixel step size, clipped to a per-pixel budget. This fused
    # form gives the same numbers as linf_step on each region in fewer
    # passes over the tensors. L2 needs per-region norms, so it keeps l2_step.
    step_map = step_fg * region_fg + step_bg * region_bg
    eps_map = config.eps_foreground * region_fg + config.eps_background * region_bg

    # The state is the clipped image itself, so the image is exactly inside
    # [0, 1] after every step; clipping only shrinks each region's delta.
    if config.random_start:
        start = random_start(images, config.eps_foreground, region_fg, config.norm, generator)
        start = start + random_start(images, config.eps_background, region_bg, config.norm, generator)
    else:
        start = torch.zeros_like(images)
    adversarial = (images + start).clamp(0.0, 1.0)
    _report_step(callback, restart, 0, config.steps, images, adversarial, region_fg, region_bg)

    for step in range(1, config.steps + 1):
        adversarial.requires_grad_(True)
        objective = _attack_loss(classifier, adversarial, classes, foreground, config, generator)
        (grad,) = torch.autograd.grad(objective, adversarial)
        adversarial = adversarial.detach()

        delta = adversarial - images
        if config.norm == "linf":
            delta = torch.clamp(delta + step_map * torch.sign(grad), -eps_map, eps_map)
        else:
            delta = l2_step(delta, grad, step_fg, config.eps_foreground, region_fg) + l2_step(
                delta, grad, step_bg, config.eps_background, region_bg
            )
        adversarial = (images + delta).clamp(0.0, 1.0)
        _report_step(callback, restart, step, config.steps, images, adversarial, region_fg, region_bg)

    return adversarial.detach()


def _report_step(callback, restart, step, total, images, adversarial, region_fg, region_bg) -> None:
    if callback is None:
        return
    delta = adversarial.detach() - images
    callback(PGDStep(restart, step, total, adversarial.detach(), delta * region_fg, delta * region_bg))


def _score(scores: torch.Tensor, classes: torch.Tensor, targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (success, attack score) per image from class scores; higher score is a stronger attack."""
    prediction = scores.argmax(dim=1)
    class_score = scores.gather(1, classes.view(-1, 1)).squeeze(1)
    if targeted:
        return prediction == classes, class_score
    return prediction != classes, 1.0 - class_score


def _save_modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(submodule, submodule.training) for submodule in module.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for submodule, training in modes:
        submodule.training = training


def _check_inputs(images, foreground, labels, targets, config) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if tuple(foreground.shape) != (batch, height, width):
        raise ValueError(f"foreground mask must be [{batch}, {height}, {width}], got shape {tuple(foreground.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must lie in 0..1; scale them before the attack")
    if labels is not None and tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    if config.targeted and targets is None:
        raise ValueError("a targeted attack needs target classes; pass targets or set targeted=False")
    if targets is not None and tuple(targets.shape) != (batch,):
        raise ValueError(f"targets must have shape [{batch}], got {tuple(targets.shape)}")


def dual_pgd_attack(
    classifier: nn.Module,
    images: torch.Tensor,
    foreground: torch.Tensor,
    config: DualPGDConfig,
    labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    callback: Callable[[PGDStep], None] | None = None,
) -> DualPGDResult:
    """Attack a batch of images with dual-budget PGD and report the outcome per image.

    ``classifier`` maps ``[B, C, H, W]`` images in 0..1 to logits (any
    normalisation lives inside it); a noise-smoothed classifier also accepts
    ``generator=`` and defines ``class_scores`` (its vote). ``foreground`` is
    ``[B, H, W]`` in 0..1, binarised at 0.5. ``labels`` are the true classes
    (default: the clean predictions); ``targets`` are required when
    ``config.targeted``. ``callback`` receives a ``PGDStep`` at the start of
    each restart and after every step. The classifier runs in eval mode and
    every submodule's train/eval flag is restored afterwards. Inputs are not
    modified.
    """
    _check_inputs(images, foreground, labels, targets, config)
    modes = _save_modes(classifier)
    classifier.eval()
    try:
        # Autograd must run even when the caller is in inference mode (ComfyUI
        # executes prompts inside torch.inference_mode()).
        with torch.inference_mode(False), torch.enable_grad():
            return _attack(classifier, images, foreground, config, labels, targets, callback)
    except RuntimeError as error:
        if "Inference tensors" in str(error):
            raise RuntimeError(
                "the classifier's weights were created inside torch.inference_mode() and cannot take part in "
                "autograd; build or load the classifier outside inference mode (loco_core.classifiers.load_classifier "
                "does this)"
            ) from error
        raise
    finally:
        _restore_modes(modes)


def _attack(classifier, images, foreground, config, labels, targets, callback) -> DualPGDResult:
    # Channels-last layout: the elementwise PGD steps keep it, and oneDNN
    # convolutions on CPU run faster on it (measured in benchmarks/bench_pgd.py).
    images = images.detach().clone(memory_format=torch.channels_last)
    foreground = binarize_mask(foreground.detach().clone()).to(images.device)
    generator = torch.Generator(device=images.device).manual_seed(config.seed)

    clean_scores = class_scores(classifier, images)
    clean_confidence, clean_prediction = clean_scores.max(dim=1)
    labels = clean_prediction.clone() if labels is None else labels.detach().clone().to(images.device)
    if targets is not None:
        targets = targets.detach().clone().to(images.device)
    num_classes = clean_scores.shape[1]
    for name, values in (("labels", labels), ("targets", targets)):
        if values is not None and values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be class indices in 0..{num_classes - 1}, got {values.tolist()}")
    classes = targets if config.targeted else labels

    best = images.clone()
    best_scores = clean_scores.clone()
    best_success = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    best_score = torch.full((images.shape[0],), -math.inf, device=images.device)
    for restart in range(config.restarts):
        adversarial = _run_restart(classifier, images, classes, foreground, config, restart, generator, callback)
        scores = class_scores(classifier, adversarial)
        success, score = _score(scores, classes, config.targeted)

        # Keep a restart when it succeeds where the best did not, or scores
        # higher with equal success.
        better = (success & ~best_success) | ((success == best_success) & (score > best_score))
        best[better] = adversarial[better]
        best_scores[better] = scores[better]
        best_success = torch.where(better, success, best_success)
        best_score = torch.where(better, score, best_score)
        logger.debug("restart %d: %d of %d images succeed", restart, int(best_success.sum()), len(best_success))

    return _build_result(
        images, best, best_scores, foreground, labels, targets, clean_prediction, clean_confidence, config
    )


def _build_result(images, adversarial, adversarial_scores, foreground, labels, targets, clean_prediction,
                  clean_confidence, config):
    adversarial_confidence, adversarial_prediction = adversarial_scores.max(dim=1)
    if config.targeted:
        success = adversarial_prediction == targets
    else:
        success = adversarial_prediction != labels

    # Results go back in the default (contiguous) layout.
    images = images.contiguous()
    adversarial = adversarial.contiguous()
    region_fg = foreground.unsqueeze(1)
    delta = adversarial - images
    delta_fg = delta * region_fg
    delta_bg = delta * (1.0 - region_fg)
    fg_linf, fg_l2 = region_norms(delta_fg)
    bg_linf, bg_l2 = region_norms(delta_bg)

    with torch.no_grad():
        salience_clean = spectral_residual_salience(images[:, :3])
        salience_adversarial = spectral_residual_salience(adversarial[:, :3])
    return DualPGDResult(
        adversarial=adversarial,
        delta_foreground=delta_fg,
        delta_background=delta_bg,
        foreground=foreground,
        labels=labels,
        targets=targets,
        success=success,
        clean_prediction=clean_prediction,
        clean_confidence=clean_confidence,
        adversarial_prediction=adversarial_prediction,
        adversarial_confidence=adversarial_confidence,
        norms={
            "foreground_linf": fg_linf,
            "foreground_l2": fg_l2,
            "background_linf": bg_linf,
            "background_l2": bg_l2,
        },
        background_salience_clean=background_salience_share(salience_clean, foreground),
        background_salience_adversarial=background_salience_share(salience_adversarial, foreground),
        config=config,
    )
