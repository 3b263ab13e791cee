"""Fixtures of the ComfyUI tier: one in-process ComfyUI for the whole test session.

Every test under tests/comfy gets the ``comfyui`` marker. Without a ComfyUI
checkout (see harness.locate) each of them is skipped with the reason, which
``pytest -rs`` prints. Test modules here must not import ComfyUI at module
level: without a checkout that import would fail at collection.

Set ``LOCO_COMFY_GPU=1`` to let ComfyUI pick the accelerator instead of
running with ``--cpu``.
"""

import os
from pathlib import Path

import pytest

from harness.locate import find_comfyui

COMFY_TESTS_DIR = Path(__file__).resolve().parent
COMFYUI_ROOT, COMFYUI_REASON = find_comfyui()

TINY_LORA_NAME = "loco_tiny_sd15_lora.safetensors"


def pytest_collection_modifyitems(config, items):
    # This hook receives the items of the whole session, so it picks out
    # the ones under tests/comfy.
    skip = pytest.mark.skip(reason=f"ComfyUI tier: {COMFYUI_REASON}")
    for item in items:
        if COMFY_TESTS_DIR not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.comfyui)
        if COMFYUI_ROOT is None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """The started ComfySession (harness.inprocess), shared by all tests of the session."""
    if COMFYUI_ROOT is None:
        pytest.skip(f"ComfyUI tier: {COMFYUI_REASON}")
    from harness.inprocess import ComfySession

    use_gpu = os.environ.get("LOCO_COMFY_GPU", "") == "1"
    session = ComfySession(comfyui_root=COMFYUI_ROOT, cpu=not use_gpu)
    session.start()
    yield session
    session.close()


def tiny_txt2img_prompt(model_seed: int = 0, noise_seed: int = 0, steps: int = 3, size: int = 32,
                        cfg: float = 2.0, batch_size: int = 1, lora_name: str | None = None,
                        lora_strength: float = 1.0) -> dict:
    """Build an API prompt: tiny SD1.5 + two conditionings + empty latent + KSampler (node "5").

    Node ids: "1" model, "2" positive, "3" negative, "4" EmptyLatentImage,
    "5" KSampler, and "6" LoraLoaderModelOnly when ``lora_name`` is given.
    """
    prompt = {
        "1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": model_seed}},
        "2": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 1, "tokens": 4}},
        "3": {"class_type": "LOCOTestConditioning", "inputs": {"seed": 2, "tokens": 4}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": size, "height": size, "batch_size": batch_size}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": noise_seed, "steps": steps, "cfg": cfg,
                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    if lora_name is not None:
        prompt["6"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": lora_strength}}
        prompt["5"]["inputs"]["model"] = ["6", 0]
    return prompt


@pytest.fixture(scope="session")
def tiny_prompt():
    """The builder ``tiny_txt2img_prompt`` (see its docstring for node ids and options)."""
    return tiny_txt2img_prompt


def lora_key_name(state_dict_key: str) -> str:
    """Map ``diffusion_model.<path>.weight`` to the ``lora_unet_<path with _>`` name of comfy/lora.py."""
    path = state_dict_key[len("diffusion_model."):-len(".weight")]
    return "lora_unet_" + path.replace(".", "_")


def tiny_lora_tensors(model_state_dict: dict, rank: int = 2, seed: int = 0, scale: float = 0.5) -> dict:
    """Make LoRA factors for every attention projection (to_q, to_k, to_v, to_out.0) of the tiny UNet.

    Each layer gets ``lora_up`` [out, rank], ``lora_down`` [rank, in] and
    ``alpha`` = rank, so ComfyUI adds up @ down to the weight at strength 1.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    projections = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    tensors = {}
    for key in sorted(model_state_dict):
        if not key.startswith("diffusion_model.") or not key.endswith(projections):
            continue
        out_features, in_features = model_state_dict[key].shape
        name = lora_key_name(key)
        tensors[f"{name}.lora_up.weight"] = scale * torch.randn((out_features, rank), generator=generator)
        tensors[f"{name}.lora_down.weight"] = scale * torch.randn((rank, in_features), generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


@pytest.fixture(scope="session")
def tiny_lora(comfy):
    """Write a LoRA for the tiny SD1.5 (model seed 0) into models/loras; return its lora_name."""
    from safetensors.torch import save_file

    result = comfy.run({"1": {"class_type": "LOCOTestTinySD15", "inputs": {"seed": 0}}}, targets=["1"])
    model_patcher = result.values("1")[0]
    tensors = tiny_lora_tensors(model_patcher.model.state_dict())
    if not tensors:
        raise RuntimeError("the tiny SD1.5 UNet has no attention projections to put a LoRA on")

    path = comfy.models_dir / "loras" / TINY_LORA_NAME
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return TINY_LORA_NAME
