"""The shipped workflows in ComfyUI's real frontend, in headless Chromium.

One ComfyUI server (127.0.0.1, this pack installed) and one browser serve the
whole module. Each workflow is loaded the way the editor opens a file. The
test checks that every node type exists and no node is marked with errors,
and saves a screenshot under docs/workflows/. It also compares
harness.convert's API prompt with the frontend's own conversion
(``app.graphToPrompt``).

Needs Debian's ``chromium`` (/usr/bin/chromium) and the Python package
``playwright`` (its own browser download is never used); the tests skip with
the reason when either is missing. Every request to a host other than
127.0.0.1 is blocked in the page.
"""

import json
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from harness.convert import ui_to_api
from harness.locate import PACK_ROOT, find_comfyui
from harness.runner import copy_samples
from harness.workflow_builder import WorkflowBuilder

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
SCREENSHOT_DIR = PACK_ROOT / "docs" / "workflows"

COMFY_ROOT, COMFY_REASON = find_comfyui()

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(COMFY_ROOT is None, reason=f"ComfyUI tier: {COMFY_REASON}"),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="no /usr/bin/chromium; install it with: apt-get install -y chromium"),
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the skip below gives the install command
    sync_playwright = None

if sync_playwright is None:
    pytestmark.append(pytest.mark.skip(reason="Python package playwright is missing; install it with: "
                                              ".venv/bin/pip install playwright (no 'playwright install' needed)"))

LOAD_AND_CONVERT = """async (workflow) => {
    window.__locoMissing = undefined;
    await app.loadGraphData(workflow, true, true, null, {showMissingNodesDialog: false});
    const prompt = await app.graphToPrompt();
    return {
        missing: window.__locoMissing === undefined ? null : window.__locoMissing,
        errorNodes: app.graph.nodes.filter((node) => node.has_errors).map((node) => node.id),
        output: prompt.output,
    };
}"""

# Scale and move the canvas so every node is in the screenshot
# (LiteGraph draws a point at (position + offset) * scale).
FIT_VIEW = """async () => {
    const nodes = app.graph.nodes;
    const left = Math.min(...nodes.map((node) => node.pos[0]));
    const top = Math.min(...nodes.map((node) => node.pos[1] - 30));
    const right = Math.max(...nodes.map((node) => node.pos[0] + node.size[0]));
    const bottom = Math.max(...nodes.map((node) => node.pos[1] + node.size[1]));
    const canvas = app.canvas.canvas;
    const margin = 40;
    const scale = Math.min(1, (canvas.width - 2 * margin) / (right - left), (canvas.height - 2 * margin) / (bottom - top));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [margin / scale - left, margin / scale - top];
    app.canvas.setDirty(true, true);
    await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
}"""

REGISTER_MISSING_HOOK = """() => {
    app.registerExtension({
        name: "ComfyUI-LOCO.tests.missingNodes",
        afterConfigureGraph(missing) { window.__locoMissing = missing; },
    });
}"""


@pytest.fixture(scope="module")
def server():
    from harness.server import ComfyServer

    base_dir = Path(tempfile.mkdtemp(prefix="loco-browser-"))
    comfy_server = ComfyServer(COMFY_ROOT, base_dir).start()
    copy_samples(comfy_server.input_dir)
    try:
        # The tutorial dialog and the minimap would cover the canvas in the
        # screenshots, and the canvas info shows a changing frame rate;
        # MinFontSizeForLOD 0 keeps text drawn when zoomed out.
        comfy_server.post_json("/api/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                                 "Comfy.Graph.CanvasInfo": False,
                                                 "LiteGraph.Canvas.MinFontSizeForLOD": 0})
        yield comfy_server
    finally:
        comfy_server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def page(server):
    def allow_loopback_only(route):
        url = urllib.parse.urlparse(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        browser_page = browser.new_page(viewport={"width": 1920, "height": 1080})
        browser_page.route("**/*", allow_loopback_only)
        browser_page.goto(server.url)
        browser_page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph"
            " && Object.keys(window.LiteGraph.registered_node_types).length > 0",
            timeout=180_000,
        )
        browser_page.evaluate(REGISTER_MISSING_HOOK)
        yield browser_page
        browser.close()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def load_in_frontend(page, workflow: dict) -> dict:
    return page.evaluate(LOAD_AND_CONVERT, workflow)


def backend_inputs_only(prompt: dict, object_info: dict) -> dict:
    """Drop inputs that no schema declares, which the backend ignores.

    The frontend serializes some widgets of its own, such as PreviewAny's
    read-only "preview" text, into the prompt.
    """
    cleaned = {}
    for node_id, node in prompt.items():
        declared = object_info[node["class_type"]]["input"]
        names = set(declared.get("required", {})) | set(declared.get("optional", {}))
        cleaned[node_id] = dict(node, inputs={k: v for k, v in node["inputs"].items() if k in names})
    return cleaned


def feature_graph(object_info: dict) -> dict:
    """A graph of core nodes with every conversion rule: seeds, primitives, reroutes, bypass, mute, notes."""
    builder = WorkflowBuilder(object_info)
    checkpoint = builder.add("CheckpointLoaderSimple")
    positive = builder.add("CLIPTextEncode", {"text": "a red fox in snow"})
    negative = builder.add("CLIPTextEncode", {"text": "blurry"})
    latent = builder.add("EmptyLatentImage", {"width": 320, "height": 256, "batch_size": 2})
    sampler = builder.add("KSampler", {"seed": 5, "steps": 9, "cfg": 2.5, "sampler_name": "dpmpp_2m",
                                       "scheduler": "karras", "denoise": 0.8})
    decode = builder.add("VAEDecode")
    invert = builder.add("ImageInvert")
    blend = builder.add("ImageBlend", {"blend_factor": 0.25}, mode=4)  # bypassed
    muted = builder.add("ImageInvert", title="Muted invert", mode=2)
    preview = builder.add("PreviewImage")
    save = builder.add("SaveImage", {"filename_prefix": "features"})
    load = builder.add("LoadImage", {"image": "missing.png"})
    builder.add("LoadImageMask", {"image": "mask.png", "channel": "green"})
    builder.add("RegexReplace", {"string": "abc", "regex_pattern": "b", "replace": "x", "count": 3})
    builder.add("SamplerCustom", {"noise_seed": 11, "cfg": 3.5})
    reroute = builder.reroute("IMAGE")
    primitive = builder.primitive("steps", "INT", 17)
    builder.note("Feature graph for the converter check.", markdown=False)

    builder.connect(checkpoint, "MODEL", sampler, "model")
    builder.connect(checkpoint, "CLIP", positive, "clip")
    builder.connect(checkpoint, "CLIP", negative, "clip")
    builder.connect(positive, 0, sampler, "positive")
    builder.connect(negative, 0, sampler, "negative")
    builder.connect(latent, 0, sampler, "latent_image")
    builder.connect(primitive, 0, sampler, "steps")
    builder.connect(sampler, 0, decode, "samples")
    builder.connect(checkpoint, "VAE", decode, "vae")
    builder.connect(decode, 0, reroute, "")
    builder.connect(reroute, 0, invert, "image")
    builder.connect(invert, 0, blend, "image1")
    builder.connect(load, "IMAGE", blend, "image2")
    builder.connect(blend, 0, preview, "images")
    builder.connect(decode, 0, muted, "image")
    builder.connect(muted, 0, save, "images")
    return builder.build("feature-graph")


def test_feature_graph_matches_frontend(page, object_info):
    workflow = feature_graph(object_info)

    frontend = backend_inputs_only(load_in_frontend(page, workflow)["output"], object_info)
    converted = ui_to_api(workflow, object_info, "feature graph")

    assert converted == frontend
    assert converted["5"]["inputs"]["steps"] == 17  # from the PrimitiveNode
    assert converted["7"]["inputs"]["image"] == ["6", 0]  # through the Reroute
    assert converted["10"]["inputs"]["images"] == ["7", 0]  # through the bypassed blend
    assert "images" not in converted["11"]["inputs"]  # fed by the muted node


def test_pack_workflows_listed_as_templates(server):
    if not WORKFLOWS:
        pytest.skip("no workflows in workflows/ yet")
    templates = server.get_json("/api/workflow_templates")
    listed = next((names for folder, names in templates.items() if folder.lower() == "comfyui-loco"), None)

    assert listed is not None, f"pack folder missing from /api/workflow_templates: {sorted(templates)}"
    assert sorted(listed) == sorted(path.stem for path in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_workflow_in_frontend(page, object_info, path):
    workflow = json.loads(path.read_text())

    result = load_in_frontend(page, workflow)
    page.evaluate(FIT_VIEW)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    # Only the canvas: the tab bar around it depends on how many files were opened before.
    page.locator("#graph-canvas").screenshot(path=str(SCREENSHOT_DIR / f"{path.stem}.png"))

    assert result["missing"] == [], f"{path.name}: missing node types {result['missing']}"
    assert result["errorNodes"] == [], f"{path.name}: nodes marked with errors {result['errorNodes']}"
    assert ui_to_api(workflow, object_info, path.name) == backend_inputs_only(result["output"], object_info)
