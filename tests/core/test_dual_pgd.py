"""Dual-perturbation PGD: budgets at every step, projections, closed forms, targeted and smoothed success."""

import pytest
import torch
from torch import nn

from loco_core.classifiers import SmoothedClassifier
from loco_core.dual_pgd import (
    DualPGDConfig,
    dual_pgd_attack,
    l2_step,
    linf_step,
    project_l2,
    project_linf,
)

SIZE = 8
CHANNELS = 3
TOL = 1e-6


def small_cnn(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 6, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(6 * SIZE * SIZE, num_classes),
    )


class LinearClassifier(nn.Module):
    """Logits W x + b on flattened images, so gradients are known in closed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]) if bias is None else bias.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight.t() + self.bias


def half_mask(batch: int) -> torch.Tensor:
    """Foreground = left half of the image."""
    mask = torch.zeros(batch, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0
    return mask


def images_batch(batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, CHANNELS, SIZE, SIZE, generator=generator)


def region_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


@pytest.mark.parametrize("norm,eps_fg,eps_bg", [("linf", 4 / 255, 32 / 255), ("l2", 0.2, 1.5)])
def test_every_step_within_budgets_and_range(norm, eps_fg, eps_bg):
    images = images_batch()
    mask = half_mask(3)
    config = DualPGDConfig(eps_fg, eps_bg, norm=norm, steps=6, restarts=2, salience_weight=0.5, seed=3)
    region_fg = mask.unsqueeze(1)
    steps_seen = []

    def check(state):
        steps_seen.append((state.restart, state.step))
        assert state.adversarial.min() >= 0.0
        assert state.adversarial.max() <= 1.0
        assert (region_norm(state.delta_foreground, norm) <= eps_fg + TOL).all()
        assert (region_norm(state.delta_background, norm) <= eps_bg + TOL).all()
        assert torch.count_nonzero(state.delta_foreground * (1 - region_fg)) == 0
        assert torch.count_nonzero(state.delta_background * region_fg) == 0
        assert torch.allclose(state.adversarial - images, state.delta_foreground + state.delta_background)

    result = dual_pgd_attack(small_cnn(), images, mask, config, callback=check)

    assert steps_seen == [(r, s) for r in range(2) for s in range(7)]
    assert (result.norms[f"foreground_{norm}"] <= eps_fg + TOL).all()
    assert (result.norms[f"background_{norm}"] <= eps_bg + TOL).all()


def test_l2_projection_keeps_point_inside_ball():
    region = half_mask(2).unsqueeze(1)
    delta = torch.randn(2, CHANNELS, SIZE, SIZE) * region
    delta = 0.5 * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    assert torch.equal(project_l2(delta, 1.0, region), delta)


def test_l2_projection_scales_point_outside_ball_onto_sphere():
    region = half_mask(2).unsqueeze(1)
    delta = torch.randn(2, CHANNELS, SIZE, SIZE) * region
    projected = project_l2(delta * 10, 0.3, region)

    assert torch.allclose(projected.flatten(1).norm(dim=1), torch.full((2,), 0.3))
    cosine = nn.functional.cosine_similarity(projected.flatten(1), delta.flatten(1))
    assert torch.allclose(cosine, torch.ones(2))


def test_linf_projection_clips_and_restricts_to_region():
    region = half_mask(1).unsqueeze(1)
    delta = torch.full((1, CHANNELS, SIZE, SIZE), 0.7)
    projected = project_linf(delta, 0.1, region)

    assert torch.equal(projected, 0.1 * region.expand_as(delta))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_background_budget_keeps_background_identical(norm):
    images = images_batch()
    mask = half_mask(3)
    config = DualPGDConfig(0.3, 0.0, norm=norm, steps=5, restarts=2, salience_weight=1.0)
    background = (1 - mask).bool().unsqueeze(1).expand_as(images)

    def check(state):
        assert torch.equal(state.adversarial[background], images[background])

    result = dual_pgd_attack(small_cnn(), images, mask, config, callback=check)

    assert torch.equal(result.adversarial[background], images[background])
    assert (result.norms["background_linf"] == 0).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_foreground_step_ignores_background_gradient(norm):
    # Two 2-class linear models share foreground weights; the background
    # weights differ 20-fold. The foreground step must be the same.
    mask = half_mask(1)
    region_fg = mask.unsqueeze(1).expand(1, CHANNELS, SIZE, SIZE).flatten(1)
    generator = torch.Generator().manual_seed(5)
    direction = torch.randn(1, CHANNELS * SIZE * SIZE, generator=generator)
    weight_small = torch.cat([direction, torch.zeros_like(direction)])
    weight_large = weight_small.clone()
    weight_large[0] = direction[0] * region_fg[0] + 20 * direction[0] * (1 - region_fg[0])

    images = torch.full((1, CHANNELS, SIZE, SIZE), 0.5)
    config = DualPGDConfig(0.2, 0.4, norm=norm, steps=1, step_foreground=0.05, step_background=0.3, random_start=False)
    deltas = []
    for weight in (weight_small, weight_large):
        result = dual_pgd_attack(LinearClassifier(weight), images, mask, config, labels=torch.tensor([0]))
        deltas.append(result.delta_foreground)

    assert deltas[0].abs().sum() > 0
    assert torch.allclose(deltas[0], deltas[1], atol=1e-7)


def test_l2_step_normalises_masked_gradient():
    region = half_mask(1).unsqueeze(1)
    grad = torch.zeros(1, CHANNELS, SIZE, SIZE)
    grad[..., 0] = 1.0  # foreground column
    grad[..., -1] = 1000.0  # background column
    step = l2_step(torch.zeros_like(grad), grad, 0.1, 10.0, region)

    assert torch.allclose(step.flatten(1).norm(dim=1), torch.tensor([0.1]))


def test_linf_step_moves_only_inside_region():
    region = half_mask(1).unsqueeze(1)
    grad = torch.randn(1, CHANNELS, SIZE, SIZE)
    step = linf_step(torch.zeros_like(grad), grad, 0.01, 0.05, region)

    assert torch.equal(step, 0.01 * torch.sign(grad) * region)


def test_attack_linf_step_equals_per_region_steps():
    # The attack fuses the two L-inf region steps into one. One step from the
    # clean image must equal linf_step on each region, clipped to [0, 1].
    model = small_cnn()
    model.eval()
    images = images_batch()
    mask = half_mask(3)
    region_fg = mask.unsqueeze(1)
    labels = torch.tensor([0, 1, 2])
    config = DualPGDConfig(0.03, 0.2, norm="linf", steps=1, step_foreground=0.01, step_background=0.07,
                           random_start=False)

    result = dual_pgd_attack(model, images, mask, config, labels=labels)

    adversarial = images.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(adversarial), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, adversarial)
    zero = torch.zeros_like(images)
    delta = linf_step(zero, grad, 0.01, 0.03, region_fg) + linf_step(zero, grad, 0.07, 0.2, 1 - region_fg)
    assert torch.allclose(result.adversarial, (images + delta).clamp(0, 1), atol=1e-7)


def test_linf_attack_linear_model_closed_form():
    # For two classes, the margin (w_1 - w_0) . delta is maximised over the
    # dual box by eps_R * sign(w_1 - w_0) on each region R.
    mask = half_mask(2)
    region_fg = mask.unsqueeze(1)
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(2, CHANNELS * SIZE * SIZE, generator=generator)
    images = torch.full((2, CHANNELS, SIZE, SIZE), 0.5)
    eps_fg, eps_bg = 0.02, 0.25
    config = DualPGDConfig(eps_fg, eps_bg, norm="linf", steps=20, seed=2)

    result = dual_pgd_attack(LinearClassifier(weight), images, mask, config, labels=torch.tensor([0, 0]))

    sign = torch.sign(weight[1] - weight[0]).view(1, CHANNELS, SIZE, SIZE)
    expected = sign * (eps_fg * region_fg + eps_bg * (1 - region_fg))
    assert torch.allclose(result.adversarial - images, expected.expand_as(images), atol=TOL)


def test_l2_attack_linear_model_closed_form():
    # In L2 the optimum per region is eps_R * w_R / ||w_R|| with w = w_1 - w_0.
    mask = half_mask(1)
    region_fg = mask.unsqueeze(1)
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(2, CHANNELS * SIZE * SIZE, generator=generator)
    images = torch.full((1, CHANNELS, SIZE, SIZE), 0.5)
    eps_fg, eps_bg = 0.1, 0.8
    config = DualPGDConfig(eps_fg, eps_bg, norm="l2", steps=10, random_start=False)

    result = dual_pgd_attack(LinearClassifier(weight), images, mask, config, labels=torch.tensor([0]))

    w = (weight[1] - weight[0]).view(1, CHANNELS, SIZE, SIZE)
    expected = torch.zeros_like(images)
    for region, eps in ((region_fg, eps_fg), (1 - region_fg, eps_bg)):
        w_region = w * region
        expected += eps * w_region / w_region.norm()
    assert torch.allclose(result.adversarial - images, expected, atol=TOL)


def test_targeted_success_means_target_class():
    # Logits from the region means f (foreground) and b (background):
    # class 0: 0, class 1: 10 b - 6, class 2: 20 f + 20 b - 120. Aiming at
    # class 2 raises both means, which within the budget (b <= 0.8) lands on
    # class 1, not the target; that must not count as success.
    pixels = CHANNELS * SIZE * SIZE
    mask = half_mask(1)
    region_fg = mask.unsqueeze(1).expand(1, CHANNELS, SIZE, SIZE).flatten(1)[0]
    region_bg = 1.0 - region_fg
    region_pixels = pixels / 2
    weight = torch.zeros(3, pixels)
    weight[1] = 10.0 * region_bg / region_pixels
    weight[2] = 20.0 * (region_fg + region_bg) / region_pixels
    model = LinearClassifier(weight, torch.tensor([0.0, -6.0, -120.0]))
    images = torch.full((1, CHANNELS, SIZE, SIZE), 0.5)
    config = DualPGDConfig(0.01, 0.3, norm="linf", steps=10, targeted=True)

    clean = model(images).argmax(dim=1)
    result = dual_pgd_attack(model, images, mask, config, labels=clean, targets=torch.tensor([2]))

    assert clean.item() == 0
    assert result.adversarial_prediction.item() == 1
    assert not result.success.item()

    easy = dual_pgd_attack(model, images, mask, config, labels=clean, targets=torch.tensor([1]))
    assert easy.adversarial_prediction.item() == 1
    assert easy.success.item()


def test_targeted_attack_without_targets_raises():
    with pytest.raises(ValueError, match="targeted"):
        dual_pgd_attack(small_cnn(), images_batch(), half_mask(3), DualPGDConfig(0.1, 0.1, targeted=True))


class TinyBase(nn.Module):
    """Two classes decided by the mean pixel value against 0.5."""

    labels = ["low", "high"]

    def forward(self, images):
        score = 40.0 * (images.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([-score, score], dim=1)


def test_smoothed_success_decided_by_majority_vote():
    # Mean 0.51 is classified "high". Noise (sigma 0.5 on 192 pixels,
    # std of the mean 0.036) makes single draws disagree often. The attack's
    # report must equal a majority vote over many seeded draws, and repeat
    # exactly.
    smoothed = SmoothedClassifier(TinyBase(), noise_sigma=0.5, vote_draws=501, vote_seed=9)
    images = torch.full((2, CHANNELS, SIZE, SIZE), 0.51)
    mask = half_mask(2)
    config = DualPGDConfig(0.005, 0.02, norm="linf", steps=5, eot_draws=8, seed=4)

    result = dual_pgd_attack(smoothed, images, mask, config)
    again = dual_pgd_attack(smoothed, images, mask, config)

    generator = torch.Generator().manual_seed(1234)
    votes = torch.stack(
        [TinyBase()(result.adversarial + 0.5 * torch.randn(result.adversarial.shape, generator=generator)).argmax(1)
         for _ in range(2001)]
    )
    majority = (votes.float().mean(dim=0) > 0.5).long()
    single_draw_share = votes.float().mean(dim=0)
    assert ((single_draw_share > 0.02) & (single_draw_share < 0.98)).all()
    assert torch.equal(result.adversarial_prediction, majority)
    assert torch.equal(result.success, result.adversarial_prediction != result.clean_prediction)
    assert torch.equal(result.clean_prediction, torch.tensor([1, 1]))
    assert result.success.all()
    assert torch.equal(result.adversarial, again.adversarial)


def test_eval_mode_during_attack_and_modes_restored():
    model = small_cnn()
    model.train()
    model[2].eval()  # a caller's mixed modes must come back as they were
    modes_seen = []
    model.register_forward_pre_hook(lambda module, args: modes_seen.append(module[2].training or module.training))

    dual_pgd_attack(model, images_batch(), half_mask(3), DualPGDConfig(0.05, 0.1, steps=2))

    assert modes_seen and not any(modes_seen)
    assert model.training
    assert not model[2].training
    assert model[0].training


def test_attack_does_not_modify_inputs():
    images = images_batch()
    mask = half_mask(3) * 0.9
    images_copy, mask_copy = images.clone(), mask.clone()

    dual_pgd_attack(small_cnn(), images, mask, DualPGDConfig(0.05, 0.1, steps=2, salience_weight=1.0))

    assert torch.equal(images, images_copy)
    assert torch.equal(mask, mask_copy)


def test_attack_runs_inside_inference_mode():
    model = small_cnn()
    with torch.inference_mode():
        images = images_batch()
        result = dual_pgd_attack(model, images, half_mask(3), DualPGDConfig(0.05, 0.2, steps=3))

    assert result.norms["background_linf"].max() > 0


def test_restarts_keep_best_per_image():
    model = small_cnn(seed=3)
    images = images_batch(batch=6, seed=8)
    mask = half_mask(6)
    single = dual_pgd_attack(model, images, mask, DualPGDConfig(0.01, 0.03, steps=3, restarts=1, seed=0))
    several = dual_pgd_attack(model, images, mask, DualPGDConfig(0.01, 0.03, steps=3, restarts=4, seed=0))

    # The first restart is the same run, so the best of four can only be
    # at least as successful on every image.
    assert (several.success.int() >= single.success.int()).all()
    with torch.no_grad():
        model.eval()
        recomputed = model(several.adversarial).argmax(dim=1)
    assert torch.equal(recomputed, several.adversarial_prediction)


def test_report_records_are_plain_python():
    result = dual_pgd_attack(small_cnn(), images_batch(), half_mask(3), DualPGDConfig(0.05, 0.1, steps=2))
    records = result.per_image()

    assert len(records) == 3
    assert set(records[0]) >= {
        "success",
        "clean_prediction",
        "adversarial_confidence",
        "foreground_l2",
        "background_linf",
        "background_salience_share_clean",
        "background_salience_share_adversarial",
    }
    assert all(isinstance(value, (int, float, bool, type(None))) for value in records[0].values())
    assert 0.0 <= result.summary()["success_rate"] <= 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"norm": "l1"}, "norm"),
        ({"eps_foreground": -0.1}, "eps_foreground"),
        ({"eps_background": 2.0}, "eps_background"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"eot_draws": 0}, "eot_draws"),
        ({"salience_weight": -1.0}, "salience_weight"),
        ({"step_foreground": -0.1}, "step_foreground"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    values = {"eps_foreground": 0.01, "eps_background": 0.1}
    values.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DualPGDConfig(**values)


def test_images_outside_unit_range_raise():
    with pytest.raises(ValueError, match="0..1"):
        dual_pgd_attack(small_cnn(), images_batch() * 2, half_mask(3), DualPGDConfig(0.01, 0.1))


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="foreground mask"):
        dual_pgd_attack(small_cnn(), images_batch(), torch.ones(3, 4, 4), DualPGDConfig(0.01, 0.1))
