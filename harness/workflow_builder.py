"""Build UI-format workflows (what the ComfyUI frontend saves) from node schemas.

``scripts/make_workflows.py`` uses this to write the shipped workflows, and
the ComfyUI tests use it for graphs of core nodes. Widget values come from
the schema defaults in ``input_order`` order, with the frontend's extra
control value after seed widgets, so the files load in the editor exactly
like hand-saved ones.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from .convert import NodeSchema

COLUMN_WIDTH = 360
NODE_WIDTH = 320
ROW_GAP = 40
SLOT_HEIGHT = 22
WIDGET_HEIGHT = 26
TITLE_HEIGHT = 30
MULTILINE_HEIGHT = 80


@dataclass
class NodeRef:
    id: int
    type: str
    schema: NodeSchema | None
    data: dict = field(repr=False)

    def output_index(self, output: int | str) -> int:
        if isinstance(output, int):
            return output
        names = [slot["name"] for slot in self.data["outputs"]]
        types = [slot["type"] for slot in self.data["outputs"]]
        if output in names:
            return names.index(output)
        if output in types:
            return types.index(output)
        raise KeyError(f"node {self.id} ({self.type}) has no output {output!r}; outputs: {names}")


class WorkflowBuilder:
    """Collects nodes and links, lays them out in columns and returns the UI JSON."""

    def __init__(self, object_info: Mapping[str, dict]):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.refs: dict[int, NodeRef] = {}
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.columns: dict[int, int] = {}

    def add(self, node_type: str, widgets: Mapping[str, Any] | None = None, *, title: str | None = None,
            column: int | None = None, mode: int = 0) -> NodeRef:
        """Add a node with schema defaults, overridden by ``widgets`` (by input name)."""
        info = self.object_info.get(node_type)
        if info is None:
            raise KeyError(f"node type {node_type!r} is not in the schemas; is its node pack loaded?")
        schema = NodeSchema.from_info(node_type, info)
        widgets = dict(widgets or {})
        unknown = set(widgets) - set(schema.widget_slots)
        if unknown:
            raise KeyError(f"{node_type} has no widget inputs {sorted(unknown)}; widgets: {list(schema.widget_slots)}")

        values: list[Any] = []
        inputs: list[dict] = []
        for spec in schema.inputs:
            if spec.is_widget:
                values.append(widgets.get(spec.name, spec.default_value))
                values.extend(["fixed", ""][: spec.extra_widget_values])
                inputs.append({"name": spec.name, "type": spec.type, "widget": {"name": spec.name}, "link": None})
            else:
                slot = {"name": spec.name, "type": spec.type, "link": None}
                if not spec.required:
                    slot["shape"] = 7  # the frontend draws optional sockets hollow
                inputs.append(slot)
        if any(spec.type == "COMBO" and spec.options.get("image_upload") for spec in schema.inputs):
            values.append("image")  # the upload button's value, as the frontend saves it

        outputs = [
            {"name": name, "type": type_, "links": []}
            for name, type_ in zip(info.get("output_name", info["output"]), info["output"])
        ]
        node_id = len(self.nodes) + 1
        data = {
            "id": node_id, "type": node_type, "pos": [0, 0], "size": [NODE_WIDTH, 100], "flags": {},
            "order": node_id - 1, "mode": mode, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
        }
        if title:
            data["title"] = title
        multiline = sum(1 for spec in schema.inputs if spec.is_widget and spec.options.get("multiline"))
        data["size"][1] = (TITLE_HEIGHT + SLOT_HEIGHT * max(len(outputs), len(inputs) - len(schema.widget_slots))
                           + WIDGET_HEIGHT * len(values) + MULTILINE_HEIGHT * multiline)
        return self._register(data, schema, column)

    def note(self, text: str, *, title: str | None = None, column: int = 0, markdown: bool = True) -> NodeRef:
        """Add a Note or MarkdownNote (frontend-only, never executed)."""
        node_type = "MarkdownNote" if markdown else "Note"
        node_id = len(self.nodes) + 1
        data = {
            "id": node_id, "type": node_type, "pos": [0, 0],
            "size": [NODE_WIDTH, 80 + 18 * text.count("\n") + 18 * (len(text) // 45)], "flags": {},
            "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [text], "color": "#432", "bgcolor": "#653",
        }
        if title:
            data["title"] = title
        return self._register(data, None, column)

    def reroute(self, output_type: str = "*", *, column: int | None = None) -> NodeRef:
        """Add a Reroute (frontend-only pass-through) carrying ``output_type``."""
        data = {
            "id": len(self.nodes) + 1, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {},
            "order": 0, "mode": 0, "inputs": [{"name": "", "type": "*", "link": None}],
            "outputs": [{"name": "", "type": output_type, "links": []}],
            "properties": {"showOutputText": False, "horizontal": False},
        }
        return self._register(data, None, column)

    def primitive(self, target_widget: str, value_type: str, value: Any, *, column: int | None = None) -> NodeRef:
        """Add a PrimitiveNode that drives the widget ``target_widget`` (connect it afterwards)."""
        values = [value]
        if value_type in ("INT", "FLOAT", "COMBO"):
            values.append("fixed")  # the frontend adds a control widget to number and combo primitives
        if value_type == "COMBO":
            values.append("")
        data = {
            "id": len(self.nodes) + 1, "type": "PrimitiveNode", "pos": [0, 0], "size": [240, 82], "flags": {},
            "order": 0, "mode": 0, "inputs": [],
            "outputs": [{"name": value_type, "type": value_type, "links": [], "widget": {"name": target_widget}}],
            "properties": {"Run widget replace on values": False}, "widgets_values": values,
        }
        return self._register(data, None, column)

    def _register(self, data: dict, schema: NodeSchema | None, column: int | None) -> NodeRef:
        self.nodes.append(data)
        ref = NodeRef(data["id"], data["type"], schema, data)
        self.refs[ref.id] = ref
        if column is not None:
            self.columns[ref.id] = column
        return ref

    def connect(self, source: NodeRef, output: int | str, target: NodeRef, input_name: str) -> int:
        """Link ``source``'s output (index, name or type) to ``target``'s input by name."""
        slot = source.output_index(output)
        target_slots = [entry["name"] for entry in target.data["inputs"]]
        if input_name not in target_slots:
            raise KeyError(f"node {target.id} ({target.type}) has no input {input_name!r}; inputs: {target_slots}")
        target_slot = target_slots.index(input_name)
        link_type = source.data["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        target.data["inputs"][target_slot]["link"] = link_id
        source.data["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source.id, slot, target.id, target_slot, link_type])
        return link_id

    def group(self, title: str, members: list[NodeRef], color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "members": [ref.id for ref in members], "color": color})

    # -- layout ------------------------------------------------------------

    def _depths(self) -> dict[int, int]:
        depth = {node["id"]: 0 for node in self.nodes}
        for _ in range(len(self.nodes)):
            changed = False
            for _, origin, _, target, _, _ in self.links:
                if depth[target] < depth[origin] + 1:
                    depth[target] = depth[origin] + 1
                    changed = True
            if not changed:
                break
        depth.update(self.columns)
        return depth

    def _layout(self) -> None:
        heights: dict[int, float] = {}
        for node in self.nodes:
            column = self._depths()[node["id"]]
            y = heights.get(column, 60.0)
            node["pos"] = [40 + column * COLUMN_WIDTH, y]
            heights[column] = y + node["size"][1] + ROW_GAP

        for group in self.groups:
            members = [self.refs[node_id].data for node_id in group.pop("members")]
            left = min(m["pos"][0] for m in members) - 20
            top = min(m["pos"][1] for m in members) - 50
            right = max(m["pos"][0] + m["size"][0] for m in members) + 20
            bottom = max(m["pos"][1] + m["size"][1] for m in members) + 20
            group.update({"bounding": [left, top, right - left, bottom - top], "font_size": 24, "flags": {}})

    def build(self, name: str) -> dict:
        """Return the UI-format workflow (version 0.4) with a stable id derived from ``name``."""
        self._layout()
        for order, node in enumerate(sorted(self.nodes, key=lambda n: (self._depths()[n["id"]], n["id"]))):
            node["order"] = order
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-loco/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [dict(group, id=index + 1) for index, group in enumerate(self.groups)],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }
