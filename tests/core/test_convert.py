"""UI-to-API conversion and workflow validation on small hand-written graphs.

The schemas in data/object_info_snippets.json were recorded from ComfyUI
0.3.64's node definitions with harness.convert.object_info_from_mappings,
which builds the same entries as the server's /object_info.
"""

import json
from pathlib import Path

import pytest

from harness.convert import (
    WorkflowConversionError,
    NodeSchema,
    ui_to_api,
    validate_workflow,
)

SCHEMAS = json.loads((Path(__file__).parent / "data" / "object_info_snippets.json").read_text())


class Graph:
    """Builder for UI-format graphs shaped like the frontend's saved files."""

    def __init__(self):
        self.nodes = []
        self.links = []

    def node(self, node_id, node_type, widgets=None, inputs=(), outputs=(), mode=0, title=None):
        node = {
            "id": node_id,
            "type": node_type,
            "pos": [0, 0],
            "size": [200, 100],
            "flags": {},
            "order": len(self.nodes),
            "mode": mode,
            "inputs": [{"name": name, "type": type_, "link": None} for name, type_ in inputs],
            "outputs": [{"name": type_, "type": type_, "links": []} for type_ in outputs],
            "properties": {},
        }
        if widgets is not None:
            node["widgets_values"] = widgets
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, origin_id, origin_slot, target_id, target_slot):
        link_id = len(self.links) + 1
        target = next(n for n in self.nodes if n["id"] == target_id)
        origin = next(n for n in self.nodes if n["id"] == origin_id)
        link_type = target["inputs"][target_slot]["type"]
        target["inputs"][target_slot]["link"] = link_id
        origin["outputs"][origin_slot]["links"].append(link_id)
        self.links.append([link_id, origin_id, origin_slot, target_id, target_slot, link_type])
        return link_id

    def workflow(self):
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {},
                "version": 0.4}


KSAMPLER_INPUTS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                   ("latent_image", "LATENT"), ("seed", "INT")]
KSAMPLER_WIDGETS = [42, "fixed", 12, 1.5, "euler", "normal", 0.75]


def ksampler_graph():
    """Checkpoint -> two prompts -> KSampler -> VAEDecode -> SaveImage."""
    graph = Graph()
    graph.node(1, "CheckpointLoaderSimple", ["model.safetensors"], outputs=("MODEL", "CLIP", "VAE"))
    graph.node(2, "CLIPTextEncode", ["a photo"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    graph.node(3, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    graph.node(4, "EmptyLatentImage", [64, 48, 2], outputs=("LATENT",))
    graph.node(5, "KSampler", list(KSAMPLER_WIDGETS), inputs=KSAMPLER_INPUTS, outputs=("LATENT",))
    graph.node(6, "VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=("IMAGE",))
    graph.node(7, "SaveImage", ["loco"], inputs=[("images", "IMAGE")])
    graph.link(1, 1, 2, 0)
    graph.link(1, 1, 3, 0)
    graph.link(1, 0, 5, 0)
    graph.link(2, 0, 5, 1)
    graph.link(3, 0, 5, 2)
    graph.link(4, 0, 5, 3)
    graph.link(5, 0, 6, 0)
    graph.link(1, 2, 6, 1)
    graph.link(6, 0, 7, 0)
    return graph


def test_ksampler_graph_converts_fully():
    prompt = ui_to_api(ksampler_graph().workflow(), SCHEMAS)

    assert set(prompt) == {"1", "2", "3", "4", "5", "6", "7"}
    assert prompt["5"]["class_type"] == "KSampler"
    assert prompt["5"]["inputs"] == {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "seed": 42, "steps": 12, "cfg": 1.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.75,
    }
    assert prompt["4"]["inputs"] == {"width": 64, "height": 48, "batch_size": 2}
    assert prompt["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert prompt["7"]["inputs"] == {"images": ["6", 0], "filename_prefix": "loco"}
    assert prompt["5"]["_meta"] == {"title": "KSampler"}


def test_seed_control_value_is_skipped():
    schema = NodeSchema.from_info("KSampler", SCHEMAS["KSampler"])

    assert schema.widget_slots == {"seed": 0, "steps": 2, "cfg": 3, "sampler_name": 4, "scheduler": 5, "denoise": 6}


def test_noise_seed_control_value_is_skipped():
    schema = NodeSchema.from_info("SamplerCustom", SCHEMAS["SamplerCustom"])

    assert schema.widget_slots == {"add_noise": 0, "noise_seed": 1, "cfg": 3}


def test_seed_name_without_control_flag_still_skips():
    info = json.loads(json.dumps(SCHEMAS["KSampler"]))
    del info["input"]["required"]["seed"][1]["control_after_generate"]

    schema = NodeSchema.from_info("KSampler", info)

    assert schema.widget_slots["steps"] == 2


def test_seed_control_turned_off_explicitly():
    info = json.loads(json.dumps(SCHEMAS["KSampler"]))
    info["input"]["required"]["seed"][1]["control_after_generate"] = False

    schema = NodeSchema.from_info("KSampler", info)

    assert schema.widget_slots["steps"] == 1


def test_link_overrides_widget_value():
    graph = ksampler_graph()
    graph.node(8, "PrimitiveInt", [7, "fixed"], outputs=("INT",))
    graph.link(8, 0, 5, 4)

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["5"]["inputs"]["seed"] == ["8", 0]
    assert prompt["8"]["inputs"] == {"value": 7}


def test_primitive_node_value_is_substituted():
    graph = ksampler_graph()
    primitive = graph.node(8, "PrimitiveNode", [1234, "randomize"], outputs=("INT",))
    primitive["outputs"][0]["widget"] = {"name": "seed"}
    graph.link(8, 0, 5, 4)

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert "8" not in prompt
    assert prompt["5"]["inputs"]["seed"] == 1234


def test_reroutes_are_followed():
    graph = ksampler_graph()
    graph.node(20, "Reroute", inputs=[("", "*")], outputs=("IMAGE",))
    graph.node(21, "Reroute", inputs=[("", "*")], outputs=("IMAGE",))
    graph.node(9, "PreviewImage", inputs=[("images", "IMAGE")])
    graph.link(6, 0, 20, 0)
    graph.link(20, 0, 21, 0)
    graph.link(21, 0, 9, 0)

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert "20" not in prompt
    assert "21" not in prompt
    assert prompt["9"]["inputs"] == {"images": ["6", 0]}


def test_unconnected_reroute_leaves_input_out():
    graph = ksampler_graph()
    graph.node(20, "Reroute", inputs=[("", "*")], outputs=("IMAGE",))
    graph.node(9, "PreviewImage", inputs=[("images", "IMAGE")])
    graph.link(20, 0, 9, 0)

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["9"]["inputs"] == {}


def test_bypassed_node_passes_matching_type():
    graph = ksampler_graph()
    # A bypassed ImageBlend between the decode and a preview: its first IMAGE input passes through.
    graph.node(10, "ImageBlend", [0.5, "normal"], inputs=[("image1", "IMAGE"), ("image2", "IMAGE")],
               outputs=("IMAGE",), mode=4)
    graph.node(11, "ImageInvert", inputs=[("image", "IMAGE")], outputs=("IMAGE",))
    graph.node(9, "PreviewImage", inputs=[("images", "IMAGE")])
    graph.link(11, 0, 10, 0)
    graph.link(6, 0, 10, 1)
    graph.link(6, 0, 11, 0)
    graph.link(10, 0, 9, 0)

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert "10" not in prompt
    assert prompt["9"]["inputs"] == {"images": ["11", 0]}


def test_bypass_picks_type_not_slot_index():
    graph = ksampler_graph()
    # A bypassed KSampler's input 0 is MODEL, so its LATENT output takes the
    # first LATENT input (slot 3) instead.
    graph.nodes[4]["mode"] = 4

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert "5" not in prompt
    assert prompt["6"]["inputs"] == {"samples": ["4", 0], "vae": ["1", 2]}


def test_muted_node_and_its_links_are_dropped():
    graph = ksampler_graph()
    graph.nodes[5]["mode"] = 2  # VAEDecode

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert "6" not in prompt
    assert prompt["7"]["inputs"] == {"filename_prefix": "loco"}


def test_notes_and_groups_are_dropped():
    graph = ksampler_graph()
    graph.node(30, "Note", ["remember the seed"])
    graph.node(31, "MarkdownNote", ["# Files\nput the checkpoint in models/checkpoints"])
    workflow = graph.workflow()
    workflow["groups"] = [{"title": "Sampling", "bounding": [0, 0, 500, 500]}]

    prompt = ui_to_api(workflow, SCHEMAS)

    assert "30" not in prompt
    assert "31" not in prompt
    assert len(prompt) == 7


def test_upload_value_after_widgets_is_ignored():
    graph = Graph()
    graph.node(1, "LoadImage", ["cat.png", "image"], outputs=("IMAGE", "MASK"))
    graph.node(2, "LoadImageMask", ["mask.png", "red", "image"], outputs=("MASK",))

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["1"]["inputs"] == {"image": "cat.png"}
    assert prompt["2"]["inputs"] == {"image": "mask.png", "channel": "red"}


def test_optional_widgets_follow_required():
    graph = Graph()
    graph.node(1, "RegexReplace", ["abc", "b", "x", False, True, False, 2], outputs=("STRING",))

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["1"]["inputs"] == {"string": "abc", "regex_pattern": "b", "replace": "x",
                                     "case_insensitive": False, "multiline": True, "dotall": False, "count": 2}


def test_missing_widget_values_get_defaults():
    graph = Graph()
    graph.node(1, "EmptyLatentImage", [64], outputs=("LATENT",))
    graph.node(2, "RegexReplace", ["abc", "b", "x"], outputs=("STRING",))

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["1"]["inputs"] == {"width": 64, "height": 512, "batch_size": 1}
    assert prompt["2"]["inputs"]["case_insensitive"] is True
    assert prompt["2"]["inputs"]["count"] == 0


def test_list_values_are_wrapped():
    graph = Graph()
    graph.node(1, "CLIPTextEncode", [["a", "b"]], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))

    prompt = ui_to_api(graph.workflow(), SCHEMAS)

    assert prompt["1"]["inputs"] == {"text": {"__value__": ["a", "b"]}}


def test_title_goes_to_meta():
    graph = Graph()
    graph.node(1, "ImageInvert", inputs=[("image", "IMAGE")], outputs=("IMAGE",), title="Flip it")

    assert ui_to_api(graph.workflow(), SCHEMAS)["1"]["_meta"] == {"title": "Flip it"}


def test_input_is_not_mutated():
    workflow = ksampler_graph().workflow()
    before = json.dumps(workflow, sort_keys=True)

    prompt = ui_to_api(workflow, SCHEMAS)
    prompt["4"]["inputs"]["width"] = 1

    assert json.dumps(workflow, sort_keys=True) == before


def test_unknown_node_type_raises():
    graph = ksampler_graph()
    graph.node(40, "NoSuchNode", [1])

    with pytest.raises(WorkflowConversionError, match="node 40 has type 'NoSuchNode'"):
        ui_to_api(graph.workflow(), SCHEMAS, name="demo.json")


def test_api_format_input_raises():
    with pytest.raises(WorkflowConversionError, match="not a UI-format workflow"):
        ui_to_api({"1": {"class_type": "ImageInvert", "inputs": {}}}, SCHEMAS)


def test_validation_accepts_valid_graph():
    assert validate_workflow(ksampler_graph().workflow(), SCHEMAS, "ok.json",
                             ignore_combo_inputs=[("CheckpointLoaderSimple", "ckpt_name")]) == []


def test_validation_reports_bad_values():
    graph = ksampler_graph()
    graph.nodes[4]["widgets_values"] = [-1, "fixed", 0, 1.5, "no_sampler", "normal", 2.0]
    graph.node(40, "NoSuchNode", [1])

    errors = validate_workflow(graph.workflow(), SCHEMAS, "bad.json",
                               ignore_combo_inputs=[("CheckpointLoaderSimple", "ckpt_name")])

    assert "bad.json: node 5 (KSampler): input 'seed' value -1 is below the minimum 0" in errors
    assert "bad.json: node 5 (KSampler): input 'steps' value 0 is below the minimum 1" in errors
    assert any(e.startswith("bad.json: node 5 (KSampler): input 'sampler_name' value 'no_sampler' is not one of")
               for e in errors)
    assert "bad.json: node 5 (KSampler): input 'denoise' value 2.0 is above the maximum 1.0" in errors
    assert "bad.json: node 40: node type 'NoSuchNode' does not exist" in errors
    assert len(errors) == 5


def test_validation_reports_missing_link_and_values():
    graph = ksampler_graph()
    graph.nodes[3]["widgets_values"] = [64]  # EmptyLatentImage without height and batch size
    graph.nodes[5]["inputs"][1]["link"] = None  # VAEDecode without a VAE

    errors = validate_workflow(graph.workflow(), SCHEMAS, "gaps.json",
                               ignore_combo_inputs=[("CheckpointLoaderSimple", "ckpt_name")])

    assert "gaps.json: node 4 (EmptyLatentImage): input 'height' has no widget value" in errors
    assert "gaps.json: node 6 (VAEDecode): required input 'vae' is not connected" in errors


def test_validation_can_allow_missing_values():
    graph = ksampler_graph()
    graph.nodes[3]["widgets_values"] = [64]

    errors = validate_workflow(graph.workflow(), SCHEMAS, "old.json", require_all_values=False,
                               ignore_combo_inputs=[("CheckpointLoaderSimple", "ckpt_name")])

    assert errors == []


def test_validation_checks_combo_against_schema():
    graph = ksampler_graph()

    errors = validate_workflow(graph.workflow(), SCHEMAS, "ckpt.json")

    assert len(errors) == 1
    assert "node 1 (CheckpointLoaderSimple): input 'ckpt_name' value 'model.safetensors' is not one of" in errors[0]
