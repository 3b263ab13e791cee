"""The training script's targets against the x0 formulas that ComfyUI applies at sampling time.

A UNet that outputs its training target exactly must give back the clean
image through ``predict_denoised``. If it did not, the shipped models would
be trained for one parameterisation and sampled with another.
"""

import sys
from pathlib import Path

import pytest
import torch

from tests.script_module import loaded_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_embedded.py"


@pytest.fixture(scope="module")
def script():
    with loaded_script(SCRIPT, "train_embedded") as module:
        yield module


class ExactTarget(torch.nn.Module):
    """A stand-in for a perfectly trained UNet, which outputs the training target of the hidden x0 and noise."""

    def __init__(self, script, x0, noise, sigma, prediction):
        super().__init__()
        self.target = script.training_target(x0, noise, sigma.view(-1, 1, 1, 1), prediction)

    def forward(self, scaled_input, timestep):
        return self.target


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_exact_target_recovers_clean_image(script, prediction):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=generator)
    sigma = torch.tensor([0.03, 1.0, 14.6])
    x = x0 + sigma.view(-1, 1, 1, 1) * noise

    model = ExactTarget(script, x0, noise, sigma, prediction)
    denoised = script.predict_denoised(model, x, sigma, torch.tensor([0, 500, 999]), prediction)
    torch.testing.assert_close(denoised, x0, rtol=0, atol=1e-5)


def test_v_target_has_unit_variance(script):
    # v = alpha * noise - s * x0 with alpha^2 + s^2 = 1, so for x0 and noise
    # of unit variance the target has unit variance at every noise level.
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(20000, generator=generator)
    noise = torch.randn(20000, generator=generator)
    for sigma in (0.03, 1.0, 14.6):
        target = script.training_target(x0, noise, torch.tensor(sigma), "v")
        assert abs(target.var().item() - 1.0) < 0.05


def noisy_batch(sigmas: list[float], seed: int):
    """Return clean images, noise, sigma, noisy images and a random UNet output, one row per sigma."""
    generator = torch.Generator().manual_seed(seed)
    count = len(sigmas)
    x0 = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(count, 3, 8, 8, generator=generator)
    sigma = torch.tensor(sigmas).view(-1, 1, 1, 1)
    x = x0 + sigma * noise
    output = torch.randn(count, 3, 8, 8, generator=generator)
    return x0, noise, sigma, x, output


def test_epsilon_loss_of_v_output_is_noise_error(script):
    # The epsilon loss of a v output equals the MSE between the true noise
    # and the noise implied by the output's x0 prediction, (x - x0_hat) / sigma.
    x0, noise, sigma, x, output = noisy_batch([0.03, 0.5, 3.0, 14.6], seed=2)

    loss = script.training_loss(output, x0, noise, sigma, "v", "epsilon")
    denoised = script.predict_denoised(lambda scaled, timestep: output, x, sigma, torch.zeros(4), "v")
    implied_noise = (x - denoised) / sigma
    torch.testing.assert_close(loss, ((implied_noise - noise) ** 2).mean(), rtol=1e-5, atol=0)

    # At one noise level the plain v loss is sigma^2 + 1 times larger, the
    # weight it puts on high noise levels compared with the epsilon loss.
    top = slice(3, 4)
    plain = script.training_loss(output[top], x0[top], noise[top], sigma[top], "v", "target")
    weighted = script.training_loss(output[top], x0[top], noise[top], sigma[top], "v", "epsilon")
    torch.testing.assert_close(plain / weighted, torch.tensor(14.6 ** 2 + 1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_caps_weight(script, prediction):
    # Min-SNR weighting: the squared x0 error at each noise level, weighted by
    # min(1 / sigma^2, gamma). Below sigma = 1 / sqrt(gamma) the weight is
    # capped, and above it the loss equals the epsilon loss.
    x0, noise, sigma, x, output = noisy_batch([0.03, 0.2, 1.0, 14.6], seed=3)

    denoised = script.predict_denoised(lambda scaled, timestep: output, x, sigma, torch.zeros(4), prediction)
    weight = (1.0 / sigma ** 2).clamp(max=script.MIN_SNR_GAMMA)
    expected = (weight * (denoised - x0) ** 2).mean()
    loss = script.training_loss(output, x0, noise, sigma, prediction, "min_snr")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)

    high = slice(2, 4)
    torch.testing.assert_close(
        script.training_loss(output[high], x0[high], noise[high], sigma[high], prediction, "min_snr"),
        script.training_loss(output[high], x0[high], noise[high], sigma[high], prediction, "epsilon"),
        rtol=1e-5, atol=0,
    )

    # At sigma 0.03 the epsilon loss weights the x0 error by 1 / 0.03^2, about
    # 1,111, and Min-SNR caps that weight at gamma.
    low = slice(0, 1)
    ratio = (script.training_loss(output[low], x0[low], noise[low], sigma[low], prediction, "epsilon")
             / script.training_loss(output[low], x0[low], noise[low], sigma[low], prediction, "min_snr"))
    torch.testing.assert_close(ratio, torch.tensor(1.0 / (0.03 ** 2 * script.MIN_SNR_GAMMA)), rtol=1e-4, atol=0)


def test_unknown_objective_rejected(script):
    spec = script.dataclasses.replace(script.DIFFUSION_SPECS["a"], loss="l1")
    with pytest.raises(SystemExit, match=r"--prediction 'v' with --loss 'l1' is invalid. Use one of these "
                                         r"prediction/loss pairs: eps/epsilon, eps/min_snr, eps/target"):
        script.check_spec(spec)

    # Every shipped model's own settings pass.
    for shipped in script.DIFFUSION_SPECS.values():
        script.check_spec(shipped)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--steps", "-1", "invalid value '-1': use a whole number of 0 or more"),
    ("--cnn-epochs", "0", "invalid value '0': use a whole number of 1 or more"),
    ("--threads", "0", "invalid value '0': use a whole number of 1 or more"),
    ("--log-every", "x", "invalid value 'x': use a whole number of 1 or more"),
    ("--device", "tpu", "invalid choice: 'tpu'"),
])
def test_bad_option_rejected(script, monkeypatch, capsys, option, value, message):
    # A bad option must stop the script before it writes any file, because an
    # untrained classifier would otherwise replace the shipped one.
    monkeypatch.setattr(sys, "argv", ["train_embedded.py", option, value])
    with pytest.raises(SystemExit):
        script.parse_args()
    assert message in capsys.readouterr().err


def test_mixed_precision_override(script, monkeypatch):
    shipped = script.DIFFUSION_SPECS["a"]
    for flag, expected in (("--no-mixed-precision", False), ("--mixed-precision", True)):
        monkeypatch.setattr(sys, "argv", ["train_embedded.py", flag])
        assert script.trial_spec(shipped, script.parse_args()).mixed_precision is expected

    monkeypatch.setattr(sys, "argv", ["train_embedded.py"])
    assert script.trial_spec(shipped, script.parse_args()) == shipped

    # The override reaches model A's first stage too, which is trained in the same run.
    monkeypatch.setattr(sys, "argv", ["train_embedded.py", "--no-mixed-precision"])
    assert script.trial_spec(shipped, script.parse_args()).base.mixed_precision is False

