"""Two-stage training of models A and C: a deepened UNet must start from the function of its base.

scripts/train_embedded.py grows the first stage's UNet (one residual block
per level) into the shipped one (two) with ``deepen_unet``. If a new block
did not start as an identity, the second stage would throw away what the
first learned. The UNets are ComfyUI's own ``UNetModel``, so these tests
need a ComfyUI checkout.
"""

import argparse
from pathlib import Path

import pytest
import torch

from tests.script_module import loaded_script

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "train_embedded.py"


@pytest.fixture(scope="module")
def script(comfy):
    with loaded_script(SCRIPT, "train_embedded") as module:
        yield module


def trained_looking_unet(script, config: dict) -> torch.nn.Module:
    """Build a UNet whose zero-initialised residual outputs are filled, so every block changes its input."""
    torch.manual_seed(0)
    model = script.build_unet(config, torch.device("cpu"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def unet_inputs(count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 3, 32, 32, generator=generator)
    timestep = torch.randint(0, 1000, (count,), generator=generator).float()
    return x, timestep


@pytest.mark.parametrize("blocks", [2, 3])
def test_deepened_unet_keeps_base_output(script, blocks):
    base_config = script.ARCH_ATTENTION
    config = script.unet_config(32, (1, 2, 2), blocks, attention_levels={2}, middle_attention=True)
    base = trained_looking_unet(script, base_config)
    deep = script.deepen_unet(base, base_config, config, torch.device("cpu")).eval()

    x, timestep = unet_inputs()
    with torch.no_grad():
        expected = base(x, timestep)
        actual = deep(x, timestep)
    # The base's output is far from zero, so agreement is not a matter of both being zero.
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in base.parameters())


def test_new_blocks_learn(script):
    """The zeroed output layers of the new blocks still get gradients, so the second stage trains them."""
    base = trained_looking_unet(script, script.ARCH_ATTENTION)
    deep = script.deepen_unet(base, script.ARCH_ATTENTION, script.ARCH_ATTENTION_DEEP, torch.device("cpu"))

    x, timestep = unet_inputs()
    deep(x, timestep).square().mean().backward()
    # Encoder block 2 and decoder block 1 are new (see deepen_unet's mapping).
    for block in (deep.input_blocks[2][0], deep.output_blocks[1][0]):
        gradient = block.out_layers[-1].weight.grad
        assert gradient is not None and gradient.abs().sum() > 0


def test_deepen_rejects_other_changes(script):
    base = trained_looking_unet(script, script.ARCH_ATTENTION)
    wider = script.unet_config(48, (1, 2, 2), 2, attention_levels={2}, middle_attention=True)
    with pytest.raises(ValueError, match="only adds residual blocks"):
        script.deepen_unet(base, script.ARCH_ATTENTION, wider, torch.device("cpu"))
    with pytest.raises(ValueError, match="only adds residual blocks"):
        script.deepen_unet(base, script.ARCH_ATTENTION, script.ARCH_ATTENTION, torch.device("cpu"))


def test_stale_first_stage_rejected(script, tmp_path):
    """A file of another architecture under the first stage's name stops the run, and nothing is written."""
    import shutil

    stale = tmp_path / "loco_digits_a_base.safetensors"
    shutil.copyfile(REPO_ROOT / "assets" / "models" / "loco_digits_b.safetensors", stale)
    args = argparse.Namespace(work_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="loco_digits_a_base.safetensors is not a loco_digits_a_base stage"):
        script.base_weights(script.A_BASE, args, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == [stale]


def test_first_stage_reused(script, tmp_path):
    """A first stage in the work folder is loaded as it is, with its own training record."""
    from safetensors.torch import save_file

    stage = trained_looking_unet(script, script.A_BASE.unet)
    state = {key: value.contiguous() for key, value in stage.state_dict().items()}
    facts = {"steps": 16000, "batch_size": 32, "seed": 1, "split": "train"}
    save_file(state, str(tmp_path / "loco_digits_a_base.safetensors"),
              metadata=script.file_metadata(script.A_BASE, facts))

    args = argparse.Namespace(work_dir=str(tmp_path))
    loaded, record = script.base_weights(script.A_BASE, args, torch.device("cpu"))
    assert record == {**facts, "file": "loco_digits_a_base.safetensors"}

    x, timestep = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, timestep), stage(x, timestep))


def test_trial_first_stage_rejected(script, tmp_path):
    """A first stage from a short trial run must not start a full run's second stage."""
    from safetensors.torch import save_file

    stage = script.build_unet(script.A_BASE.unet, torch.device("cpu"))
    state = {key: value.contiguous() for key, value in stage.state_dict().items()}
    facts = {"steps": 3, "batch_size": 32, "seed": 1, "split": "train"}
    save_file(state, str(tmp_path / "loco_digits_a_base.safetensors"),
              metadata=script.file_metadata(script.A_BASE, facts))

    args = argparse.Namespace(work_dir=str(tmp_path))
    with pytest.raises(SystemExit, match=r"was trained with \{'steps': 3\}, but loco_digits_a_base needs "
                                         r"\{'steps': 16000\}. Delete or move it"):
        script.base_weights(script.A_BASE, args, torch.device("cpu"))


@pytest.mark.parametrize(("model_file", "base_steps"), [("loco_digits_a", 16000), ("loco_digits_c", 8000)])
def test_shipped_file_records_first_stage(model_file, base_steps):
    """Models A and C share the deepened architecture, and each file records its first stage."""
    import json

    from safetensors import safe_open

    with safe_open(str(REPO_ROOT / "assets" / "models" / f"{model_file}.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    training = json.loads(metadata["training"])
    assert json.loads(metadata["unet_config"])["num_res_blocks"] == 2
    assert training["base_stage"]["steps"] == base_steps
