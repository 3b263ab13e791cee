"""Shipped workflows against a real ComfyUI: schemas, execution and the main-job command.

Every file in workflows/ is checked against the live node schemas. A
core-node graph checks that a converted UI workflow computes what the
equivalent hand-written API prompt computes. The main-job command runs end
to end in a subprocess, which executes every workflow marked for the
embedded models.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from harness.convert import object_info_from_mappings, ui_to_api, validate_workflow
from harness.locate import PACK_ROOT
from harness.locate import find_comfyui
from harness.runner import USER_FILE_INPUTS, InProcessExecutor, ServerExecutor, run_workflow
from harness.server import ServerError
from harness.workflow_builder import WorkflowBuilder

sys.path.append(str(PACK_ROOT / "scripts"))
from main_job import embedded_workflows  # noqa: E402

WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
EMBEDDED = embedded_workflows()


@pytest.fixture(scope="module")
def object_info(comfy):
    comfy_nodes = sys.modules["nodes"]  # ComfyUI's nodes.py, imported by the session
    return object_info_from_mappings(comfy_nodes.NODE_CLASS_MAPPINGS, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)


def tiny_sampler_workflow(object_info: dict) -> dict:
    """UI graph of conftest.tiny_txt2img_prompt with node ids 1-5, plus a note and a reroute."""
    builder = WorkflowBuilder(object_info)
    model = builder.add("LOCOTestTinySD15", {"seed": 0})
    positive = builder.add("LOCOTestConditioning", {"seed": 1, "tokens": 4})
    negative = builder.add("LOCOTestConditioning", {"seed": 2, "tokens": 4})
    latent = builder.add("EmptyLatentImage", {"width": 32, "height": 32, "batch_size": 1})
    sampler = builder.add("KSampler", {"seed": 3, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
                                       "scheduler": "normal", "denoise": 1.0})
    reroute = builder.reroute("LATENT")
    save = builder.add("SaveLatent", {"filename_prefix": "latents/tiny"})
    builder.note("Tiny SD1.5 graph for the converter check.")
    builder.connect(model, 0, sampler, "model")
    builder.connect(positive, 0, sampler, "positive")
    builder.connect(negative, 0, sampler, "negative")
    builder.connect(latent, 0, sampler, "latent_image")
    builder.connect(sampler, 0, reroute, "")
    builder.connect(reroute, 0, save, "samples")
    return builder.build("tiny-sampler")


def test_converted_graph_matches_api_prompt(comfy, object_info, tiny_prompt):
    workflow = tiny_sampler_workflow(object_info)
    prompt = ui_to_api(workflow, object_info, "tiny sampler")

    converted = comfy.run(prompt)
    reference = comfy.run(tiny_prompt(noise_seed=3, steps=3), targets=["5"])

    assert prompt["5"]["inputs"]["seed"] == 3
    assert prompt["7"]["inputs"]["samples"] == ["5", 0]
    assert torch.equal(converted.values("5")[0]["samples"], reference.values("5")[0]["samples"])
    assert list((comfy.output_dir / "latents").glob("tiny_*.latent"))


def test_runner_reports_files(comfy, object_info, tmp_path):
    workflow_path = tmp_path / "tiny.json"
    workflow_path.write_text(json.dumps(tiny_sampler_workflow(object_info)))

    summary = run_workflow(InProcessExecutor(comfy), workflow_path, tmp_path / "out")

    assert summary.workflow == "tiny.json"
    assert [path.suffix for path in summary.files] == [".latent"]
    assert summary.files[0].stat().st_size > 0


def test_runner_server_mode(object_info, tmp_path):
    builder = WorkflowBuilder(object_info)
    image = builder.add("EmptyImage", {"width": 16, "height": 8, "color": 0x102030})
    invert = builder.add("ImageInvert")
    save = builder.add("SaveImage", {"filename_prefix": "server"})
    builder.connect(image, 0, invert, "image")
    builder.connect(invert, 0, save, "images")
    workflow_path = tmp_path / "server.json"
    workflow_path.write_text(json.dumps(builder.build("server")))

    executor = ServerExecutor(find_comfyui()[0])
    try:
        summary = run_workflow(executor, workflow_path, tmp_path / "out")
        with pytest.raises(ServerError, match="value_smaller_than_min|Value -3 smaller than min"):
            executor.server.run({"1": {"class_type": "EmptyImage",
                                       "inputs": {"width": -3, "height": 8, "batch_size": 1, "color": 0}},
                                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    finally:
        executor.close()

    assert executor.server.process is None
    assert [path.name for path in summary.files] == ["server_00001_.png"]
    with Image.open(summary.files[0]) as made:
        assert made.size == (16, 8)
        assert made.convert("RGB").getpixel((0, 0)) == (255 - 0x10, 255 - 0x20, 255 - 0x30)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_shipped_workflow_is_valid(object_info, path):
    workflow = json.loads(path.read_text())

    errors = validate_workflow(workflow, object_info, path.name, ignore_combo_inputs=USER_FILE_INPUTS)

    assert errors == []
    assert workflow["version"] == 0.4
    assert ui_to_api(workflow, object_info, path.name)


def run_main_job(env_overrides: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, str(PACK_ROOT / "scripts" / "main_job.py"), *args],
                          cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_main_job_without_comfyui(tmp_path):
    result = run_main_job({"COMFYUI_PATH": str(tmp_path)})

    assert result.returncode == 2
    assert "is not a ComfyUI checkout" in result.stderr
    assert "COMFYUI_PATH=/path/to/ComfyUI bash scripts/main_job.sh" in result.stderr


def test_main_job_end_to_end(comfy, tmp_path):
    if not EMBEDDED:
        pytest.skip("no shipped workflow is marked for the embedded models yet")

    result = run_main_job({"COMFYUI_PATH": str(comfy.comfyui_root)}, "--output", str(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    for path in EMBEDDED:
        assert f"== {path.name} (" in result.stdout
        made = sorted((tmp_path / path.stem).iterdir())
        assert made, f"{path.name} made no files"
        assert all(file.stat().st_size > 0 for file in made)
    assert f"{len(EMBEDDED)} of {len(EMBEDDED)} workflow(s) finished" in result.stdout
