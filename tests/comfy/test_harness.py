"""The in-process harness against the real ComfyUI executor, with the tiny SD1.5 test model."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest

from harness.inprocess import (
    PACK_FOLDER_NAME,
    ComfySession,
    TEST_NODES_FOLDER_NAME,
    PromptExecutionError,
    PromptInterruptedError,
    PromptValidationError,
)
from harness.locate import PACK_ROOT, find_comfyui


def test_pack_and_test_nodes_load(comfy):
    assert comfy.custom_node_results[PACK_FOLDER_NAME] is True
    assert comfy.custom_node_results[TEST_NODES_FOLDER_NAME] is True
    assert {"LOCOTestTinySD15", "LOCOTestConditioning"} <= comfy.node_types()
    assert {"KSampler", "LoraLoaderModelOnly", "EmptyLatentImage"} <= comfy.node_types()


def test_session_folders_exist(comfy):
    assert (comfy.models_dir / "loras").is_dir()
    assert comfy.input_dir.is_dir()
    assert comfy.output_dir.is_dir()
    assert (comfy.custom_nodes_dir / PACK_FOLDER_NAME).resolve() == PACK_ROOT.resolve()


def test_tiny_sd15_is_model_patcher(comfy):
    import torch
    from comfy.model_patcher import ModelPatcher

    result = comfy.run({"1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 3}}}, targets=["1"])
    (model,) = result.values("1")

    assert isinstance(model, ModelPatcher)
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert weight.is_inference()
    assert torch.isfinite(weight.detach()).all()


def test_tiny_sd15_seed_sets_weights(comfy):
    import torch

    prompt = {
        "1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 5}},
        "2": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 6}},
    }
    result = comfy.run(prompt, targets=["1", "2"])
    first = result.values("1")[0].model.diffusion_model.out[2].weight
    second = result.values("2")[0].model.diffusion_model.out[2].weight

    assert not torch.equal(first, second)


def test_conditioning_format(comfy):
    result = comfy.run({"1": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 0, "tokens": 7}}},
                       targets=["1"])
    (conditioning,) = result.values("1")

    assert len(conditioning) == 1
    cond, extras = conditioning[0]
    assert tuple(cond.shape) == (1, 7, 64)
    assert extras == {}


def test_ksampler_latent_shape_and_finite(comfy, tiny_prompt):
    import torch

    result = comfy.run(tiny_prompt(size=32, batch_size=2), targets=["5"])
    samples = result.values("5")[0]["samples"]

    assert tuple(samples.shape) == (2, 4, 4, 4)
    assert torch.isfinite(samples).all()
    assert samples.std() > 0
    assert "5" in result.executed


def test_ksampler_output_node_run_without_targets(comfy, tiny_prompt):
    # A KSampler is no output node, so ComfyUI's own rule (run the output
    # nodes) needs one: PreviewAny displays a value and is an output node.
    prompt = tiny_prompt(steps=2)
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}
    result = comfy.run(prompt)

    assert "9" in result.ui
    assert "5" not in result.executed


def test_lora_changes_ksampler_result(comfy, tiny_prompt, tiny_lora):
    import torch

    plain = comfy.run(tiny_prompt(steps=2), targets=["5"]).values("5")[0]["samples"]
    patched = comfy.run(tiny_prompt(steps=2, lora_name=tiny_lora), targets=["5"]).values("5")[0]["samples"]
    # The LoRA patches the shared UNet weights while it samples; ComfyUI
    # must restore them for the plain model afterwards.
    again = comfy.run(tiny_prompt(steps=2), targets=["5"]).values("5")[0]["samples"]

    assert torch.equal(plain, again)
    assert not torch.allclose(plain, patched, atol=1e-4)


def test_lora_keys_all_map_to_unet(comfy, tiny_lora):
    from comfy.lora import model_lora_keys_unet
    from safetensors.torch import load_file

    model = comfy.run({"1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0}}},
                      targets=["1"]).values("1")[0]
    key_map = model_lora_keys_unet(model.model, {})
    lora = load_file(str(comfy.models_dir / "loras" / tiny_lora))
    layer_names = {name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]
                   for name in lora}

    assert layer_names
    assert layer_names <= set(key_map)


def test_invalid_input_raises_validation_error(comfy, tiny_prompt):
    prompt = tiny_prompt()
    prompt["5"]["inputs"]["sampler_name"] = "no_such_sampler"

    with pytest.raises(PromptValidationError, match="sampler_name") as excinfo:
        comfy.run(prompt, targets=["5"])
    assert "5" in excinfo.value.node_errors


def test_unknown_node_type_raises_validation_error(comfy):
    with pytest.raises(PromptValidationError, match="NoSuchNode"):
        comfy.run({"1": {"class_type": "NoSuchNode", "inputs": {}}}, targets=["1"])


def test_missing_output_node_raises_validation_error(comfy):
    with pytest.raises(PromptValidationError, match="no outputs"):
        comfy.run({"1": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 0, "tokens": 2}}})


def test_node_exception_raises_execution_error(comfy):
    prompt = {"1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0, "model_channels": 48}}}

    with pytest.raises(PromptExecutionError, match="model_channels is 48") as excinfo:
        comfy.run(prompt, targets=["1"])
    assert excinfo.value.node_id == "1"
    assert excinfo.value.node_type == "LOCOTestTinySD15"
    assert isinstance(excinfo.value.original, ValueError)


def test_interrupt_during_sampling(comfy, tiny_prompt):
    def interrupt_on_first_step(event, data):
        if event == "progress" and data.get("node") == "5":
            comfy.interrupt()

    with pytest.raises(PromptInterruptedError, match="interrupted at node 5") as excinfo:
        comfy.run(tiny_prompt(noise_seed=11, steps=4), targets=["5"], on_event=interrupt_on_first_step)
    assert excinfo.value.node_id == "5"
    assert excinfo.value.node_type == "KSampler"

    # The next prompt starts with the flag cleared and runs to the end.
    result = comfy.run(tiny_prompt(noise_seed=11, steps=1), targets=["5"])
    assert "5" in result.executed


def test_unchanged_prompt_is_cached(comfy, tiny_prompt):
    prompt = tiny_prompt(noise_seed=21, steps=1)
    first = comfy.run(prompt, targets=["5"])
    second = comfy.run(prompt, targets=["5"])

    assert "5" in first.executed
    assert "5" in second.cached
    assert "5" not in second.executed
    assert second.values("5")[0] is first.values("5")[0]


def test_run_leaves_prompt_unchanged(comfy, tiny_prompt):
    prompt = tiny_prompt(steps=1)
    expected = copy.deepcopy(prompt)
    comfy.run(prompt, targets=["5"])

    assert prompt == expected


def test_values_of_node_not_run(comfy, tiny_prompt):
    result = comfy.run(tiny_prompt(steps=1), targets=["2"])

    with pytest.raises(KeyError, match="node 5 has no cached outputs"):
        result.values("5")


def test_values_of_list_outputs(comfy):
    # RebatchLatents declares a list output; LatentUpscaleBy then runs once
    # per list item, so both nodes report a list of three latents.
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 3}},
        "2": {"class_type": "RebatchLatents", "inputs": {"latents": ["1", 0], "batch_size": 1}},
        "3": {"class_type": "LatentUpscaleBy",
              "inputs": {"samples": ["2", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}},
    }
    result = comfy.run(prompt, targets=["3"])
    (rebatched,) = result.values("2")
    (upscaled,) = result.values("3")
    (single,) = result.values("1")

    assert isinstance(single, dict)
    assert [tuple(item["samples"].shape) for item in rebatched] == [(1, 4, 2, 2)] * 3
    assert [tuple(item["samples"].shape) for item in upscaled] == [(1, 4, 4, 4)] * 3
    assert len(result.value_lists("1")[0]) == 1


def test_second_session_start_raises(comfy):
    with pytest.raises(RuntimeError, match="already started in this process"):
        ComfySession().start()


def test_start_reports_broken_folder(tmp_path):
    # Only harness/ is importable in the child process, as in a real install
    # where ComfyUI loads the pack by path: the pack must then import its own
    # modules relatively and still load.
    import_dir = tmp_path / "import_path"
    import_dir.mkdir()
    (import_dir / "harness").symlink_to(PACK_ROOT / "harness", target_is_directory=True)
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('missing dependency for the test')\n")
    script = textwrap.dedent(f"""
        import sys
        from harness.inprocess import ComfySession, CustomNodeImportError
        try:
            ComfySession(include_test_nodes=False, extra_custom_nodes={{"broken_pack": {str(broken)!r}}}).start()
        except CustomNodeImportError as error:
            print("RAISED", error)
        print("TOP_LEVEL_LOCO_CORE", any(name.split(".")[0] == "loco_core" for name in sys.modules))
    """)
    comfyui_root, _ = find_comfyui()
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_root), PYTHONPATH=str(import_dir))
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                               env=env, timeout=300)

    assert "RAISED" in completed.stdout, completed.stderr[-3000:]
    assert "broken_pack" in completed.stdout
    assert "missing dependency for the test" in completed.stdout
    assert PACK_FOLDER_NAME not in completed.stdout
    assert "TOP_LEVEL_LOCO_CORE False" in completed.stdout
