"""Convert UI-format workflows (what the ComfyUI frontend saves) to API-format prompts.

ComfyUI's ``POST /prompt`` takes the API format: ``{node_id: {"class_type",
"inputs", "_meta"}}``. Shared workflow files are in the UI format: ``nodes``
with positional ``widgets_values`` and ``links`` rows ``[id, origin_id,
origin_slot, target_id, target_slot, type]``. Core ComfyUI has no converter
because the mapping from positions to input names needs the node schemas, so
this module takes them from ``/object_info`` or from the in-process
``nodes.NODE_CLASS_MAPPINGS`` (``object_info_from_mappings``).

The rules follow the frontend's own conversion (``app.graphToPrompt`` in
comfyui-frontend-package 1.27.10):

- widget values map onto the widget inputs in ``input_order`` order:
  required, then optional;
- an INT input with ``control_after_generate``, or named ``seed`` or
  ``noise_seed`` when that option is absent, is followed by one extra value
  (the control mode); a COMBO with ``control_after_generate`` by two (mode
  and filter);
- a link overrides the widget value of the same input;
- a link from a PrimitiveNode carries that node's value;
- Reroute nodes are followed to their source;
- notes, groups and muted nodes (mode 2) are dropped, and inputs linked to
  a muted node are removed;
- bypassed nodes (mode 4) pass an input of a matching type through;
- values after the last known widget (LoadImage's upload value) are ignored.

Validation (``validate_workflow``) checks a UI workflow against the same
schemas and reports each problem with the workflow, node id, input and value.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

MODE_ALWAYS = 0
MODE_NEVER = 2
MODE_BYPASS = 4

# Node types that exist only in the frontend: they never reach the backend.
FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})

# Input types for which the frontend builds a widget (a stored value) rather
# than a socket only. A list type is a COMBO too.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"})

# Combo options that make the frontend add an upload button widget.
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")

SEED_INPUT_NAMES = ("seed", "noise_seed")


class WorkflowConversionError(ValueError):
    """A UI workflow that cannot be converted with the given schemas."""


# ---------------------------------------------------------------------------
# Schemas


def node_info(node_id: str, node_class: type, display_names: Mapping[str, str] | None = None) -> dict:
    """Build the ``/object_info`` entry of one node class, as ComfyUI 0.3.64's server does.

    V3 nodes (``comfy_api`` ``io.ComfyNode``) describe themselves through
    ``GET_NODE_INFO_V1``; classic nodes through ``INPUT_TYPES`` and class
    attributes.
    """
    if hasattr(node_class, "GET_NODE_INFO_V1"):
        return node_class.GET_NODE_INFO_V1()

    display_names = display_names or {}
    input_types = node_class.INPUT_TYPES()
    info = {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": node_class.RETURN_TYPES,
        "output_is_list": getattr(node_class, "OUTPUT_IS_LIST", [False] * len(node_class.RETURN_TYPES)),
        "output_name": getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES),
        "name": node_id,
        "display_name": display_names.get(node_id, node_id),
        "description": getattr(node_class, "DESCRIPTION", ""),
        "python_module": getattr(node_class, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(node_class, "CATEGORY", "sd"),
        "output_node": getattr(node_class, "OUTPUT_NODE", False) is True,
    }
    if hasattr(node_class, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = node_class.OUTPUT_TOOLTIPS
    return info


def object_info_from_mappings(
    node_class_mappings: Mapping[str, type], display_names: Mapping[str, str] | None = None
) -> dict[str, dict]:
    """Build the whole ``/object_info`` response from ``nodes.NODE_CLASS_MAPPINGS``.

    A node whose schema raises is logged and left out, as the server does.
    """
    out = {}
    for node_id, node_class in node_class_mappings.items():
        try:
            out[node_id] = node_info(node_id, node_class, display_names)
        except Exception:
            logger.exception("failed to read the schema of node type %s", node_id)
    return out


@dataclass(frozen=True)
class InputSpec:
    """One input of a node schema, in the frontend's widget terms."""

    name: str
    type: str  # "COMBO" for list types
    options: dict
    required: bool
    combo_values: list | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def default_value(self) -> Any:
        """The value a new widget starts with: the schema default, else the type's zero or first choice."""
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.combo_values[0] if self.combo_values else ""
        return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(self.type)

    @property
    def extra_widget_values(self) -> int:
        """Number of frontend-only values stored after this widget's value."""
        if not self.is_widget:
            return 0
        if self.type == "INT":
            # The frontend falls back to the name only when the option is absent,
            # so an explicit control_after_generate=False turns the control off.
            control = self.options.get("control_after_generate")
            if control is None:
                control = self.name in SEED_INPUT_NAMES
            return 1 if control else 0
        if self.type == "COMBO" and self.options.get("control_after_generate"):
            return 2
        return 0


def _input_spec(name: str, raw: Any, required: bool) -> InputSpec:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise WorkflowConversionError(f"input {name!r} has a malformed schema entry {raw!r}")
    type_part = raw[0]
    options = dict(raw[1]) if len(raw) > 1 and isinstance(raw[1], dict) else {}
    if isinstance(type_part, (list, tuple)):
        return InputSpec(name, "COMBO", options, required, list(type_part))
    if type_part == "COMBO":
        return InputSpec(name, "COMBO", options, required, list(options.get("options", [])))
    return InputSpec(name, str(type_part), options, required)


@dataclass
class NodeSchema:
    """The inputs of one node type in frontend order, with its widget layout."""

    node_type: str
    inputs: list[InputSpec]
    output_types: list[str]
    # Position in widgets_values of each widget input, by name.
    widget_slots: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_info(cls, node_type: str, info: Mapping) -> "NodeSchema":
        inputs: list[InputSpec] = []
        all_inputs = info.get("input", {})
        order = info.get("input_order") or {key: list(value) for key, value in all_inputs.items()}
        for section in ("required", "optional"):
            section_inputs = all_inputs.get(section) or {}
            for name in order.get(section, list(section_inputs)):
                if name in section_inputs:
                    inputs.append(_input_spec(name, section_inputs[name], section == "required"))

        # The frontend adds an upload button input to a node with a media
        # combo. Inputs missing from input_order go last, and /object_info
        # always sends input_order, so there the upload value follows every
        # widget and is ignored. Without input_order it follows the required inputs.
        has_upload = not info.get("input_order") and any(
            spec.type == "COMBO" and any(spec.options.get(key) for key in MEDIA_UPLOAD_OPTIONS)
            for spec in inputs
            if spec.required
        )
        widget_slots: dict[str, int] = {}
        position = 0
        for index, spec in enumerate(inputs):
            if spec.is_widget:
                widget_slots[spec.name] = position
                position += 1 + spec.extra_widget_values
            is_last_required = spec.required and (index + 1 == len(inputs) or not inputs[index + 1].required)
            if has_upload and is_last_required:
                position += 1
        return cls(node_type, inputs, [str(t) for t in info.get("output", [])], widget_slots)

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


def _schema(object_info: Mapping, node_type: str, cache: dict) -> NodeSchema | None:
    if node_type not in cache:
        info = object_info.get(node_type)
        cache[node_type] = NodeSchema.from_info(node_type, info) if info is not None else None
    return cache[node_type]


# ---------------------------------------------------------------------------
# UI graph access


@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


def _links_by_id(workflow: Mapping) -> dict[int, Link]:
    links = {}
    for row in workflow.get("links", []):
        if isinstance(row, dict):
            link = Link(row["id"], row["origin_id"], row["origin_slot"], row["target_id"], row["target_slot"],
                        row.get("type", "*"))
        else:
            link = Link(*row[:6])
        links[link.id] = link
    return links


def _types_compatible(a: str, b: str) -> bool:
    """Mirror LiteGraph.isValidConnection: '*' or '' match anything, comma lists match any member."""
    if not a or not b or a == "*" or b == "*":
        return True
    left = {part.strip().lower() for part in str(a).split(",")}
    right = {part.strip().lower() for part in str(b).split(",")}
    return bool(left & right)


class _Graph:
    def __init__(self, workflow: Mapping, name: str):
        if "nodes" not in workflow or "links" not in workflow:
            raise WorkflowConversionError(
                f"{name}: not a UI-format workflow (no 'nodes' and 'links'); "
                "an API-format prompt can be sent to /prompt as it is"
            )
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowConversionError(f"{name}: subgraphs are not supported; unpack them in the editor first")
        self.name = name
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = _links_by_id(workflow)

    def input_link(self, node: Mapping, slot: int) -> Link | None:
        inputs = node.get("inputs") or []
        if slot >= len(inputs):
            return None
        link_id = inputs[slot].get("link")
        return self.links.get(link_id) if link_id is not None else None

    def resolve_output(self, node_id: int, slot: int, target_type: str, visited: set) -> tuple[str, Any] | None:
        """Follow bypassed and virtual nodes from an output to its real source.

        Returns ("link", [origin_id, slot]), ("value", primitive value) or None
        when nothing feeds the input.
        """
        key = (node_id, slot)
        if key in visited:
            raise WorkflowConversionError(f"{self.name}: circular link through node {node_id} output {slot}")
        visited.add(key)

        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowConversionError(f"{self.name}: a link points to node {node_id}, which does not exist")

        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            index = self._bypass_input_index(node, slot, target_type)
            if index < 0:
                return None
            return self.resolve_input(node, index, target_type, visited)

        node_type = node.get("type")
        if node_type == "Reroute":
            return self.resolve_input(node, 0, target_type, visited)
        if node_type == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node_type in FRONTEND_ONLY_TYPES:
            return None
        return "link", [str(node_id), int(slot)]

    def resolve_input(self, node: Mapping, slot: int, target_type: str | None, visited: set):
        link = self.input_link(node, slot)
        if link is None:
            return None
        if target_type is None:
            target_type = node["inputs"][slot].get("type", "*")
        return self.resolve_output(link.origin_id, link.origin_slot, target_type, visited)

    @staticmethod
    def _bypass_input_index(node: Mapping, slot: int, target_type: str) -> int:
        """Pick the input a bypassed node passes through, as the frontend does.

        Order: the input at the output's index when the types fit, then the
        first input of exactly the target type, then the first compatible one.
        """
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"
        if target_type in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            opposite = inputs[slot].get("type", "*")
            if _types_compatible(opposite, output_type) and _types_compatible(opposite, target_type):
                return slot
        for index, spec in enumerate(inputs):
            if spec.get("type") == target_type:
                return index
        for index, spec in enumerate(inputs):
            spec_type = spec.get("type", "*")
            if _types_compatible(spec_type, output_type) and _types_compatible(spec_type, target_type):
                return index
        return -1


# ---------------------------------------------------------------------------
# Conversion


def widget_values_by_name(node: Mapping, schema: NodeSchema, workflow_name: str = "workflow") -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto its widget input names.

    Values past the last widget (an upload button's value) are ignored. A
    dict ``widgets_values`` (saved by some frontends) is read by name.
    Widgets without a stored value (an input added to the node after the
    file was saved) are left out; ``ui_to_api`` gives them their defaults.
    """
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):
        return {name: values[name] for name in schema.widget_slots if name in values}
    if not isinstance(values, list):
        raise WorkflowConversionError(
            f"{workflow_name}: node {node.get('id')} ({schema.node_type}) has widgets_values of type "
            f"{type(values).__name__}; expected a list"
        )
    return {name: values[position] for name, position in schema.widget_slots.items() if position < len(values)}


def _api_value(value: Any) -> Any:
    # The frontend wraps list values so the backend does not read them as links.
    return {"__value__": copy.deepcopy(value)} if isinstance(value, list) else copy.deepcopy(value)


def ui_to_api(workflow: Mapping, object_info: Mapping, name: str = "workflow") -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt using node schemas.

    ``object_info`` is the ``/object_info`` response (or
    ``object_info_from_mappings``). Raises ``WorkflowConversionError`` for a
    node type that is neither in the schemas nor frontend-only.
    """
    graph = _Graph(workflow, name)
    cache: dict[str, NodeSchema | None] = {}
    output: dict[str, dict] = {}

    for node_id, node in graph.nodes.items():
        node_type = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if node_type in FRONTEND_ONLY_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        schema = _schema(object_info, node_type, cache)
        if schema is None:
            raise WorkflowConversionError(
                f"{name}: node {node_id} has type {node_type!r}, which this ComfyUI does not provide; "
                "install the node pack that defines it"
            )

        stored = widget_values_by_name(node, schema, name)
        # The frontend creates every widget with its default and then applies
        # the stored values, so a widget missing from the file keeps its default.
        inputs = {
            spec.name: _api_value(stored[spec.name] if spec.name in stored else spec.default_value)
            for spec in schema.inputs
            if spec.name in schema.widget_slots
        }
        for slot, socket in enumerate(node.get("inputs") or []):
            resolved = graph.resolve_input(node, slot, None, set())
            if resolved is None:
                continue
            kind, value = resolved
            inputs[socket["name"]] = value if kind == "link" else _api_value(value)

        output[str(node_id)] = {
            "inputs": inputs,
            "class_type": node_type,
            "_meta": {"title": node.get("title") or object_info[node_type].get("display_name", node_type)},
        }

    # Inputs fed by a dropped (muted) node are removed, as the frontend does.
    for entry in output.values():
        for input_name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                del entry["inputs"][input_name]
    return output


# ---------------------------------------------------------------------------
# Validation


def _check_value(spec: InputSpec, value: Any) -> str | None:
    """Return why ``value`` is invalid for ``spec``, or None when it is valid."""
    if spec.type == "COMBO":
        if spec.combo_values is not None and value not in spec.combo_values:
            shown = spec.combo_values if len(spec.combo_values) <= 12 else spec.combo_values[:12] + ["..."]
            return f"is not one of the choices {shown}"
        return None
    if spec.type in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is not a number ({type(value).__name__})"
        if spec.type == "INT" and isinstance(value, float) and not value.is_integer():
            return "is not an integer"
        low, high = spec.options.get("min"), spec.options.get("max")
        if low is not None and value < low:
            return f"is below the minimum {low}"
        if high is not None and value > high:
            return f"is above the maximum {high}"
        return None
    if spec.type == "BOOLEAN" and not isinstance(value, bool):
        return f"is not a boolean ({type(value).__name__})"
    if spec.type == "STRING" and not isinstance(value, str):
        return f"is not a string ({type(value).__name__})"
    return None


def validate_workflow(workflow: Mapping, object_info: Mapping, name: str = "workflow",
                      ignore_combo_inputs: Iterable[tuple[str, str]] = (),
                      require_all_values: bool = True) -> list[str]:
    """Check a UI workflow against node schemas; return one message per problem.

    Checks that every node type exists (frontend-only types excepted) and
    that every widget value is valid (combo choices, numeric min/max, value
    types). With ``require_all_values`` it also reports missing widget
    values, as in a file saved before the node gained an input (the editor
    fills in defaults there).
    ``ignore_combo_inputs`` lists (node type, input) pairs whose combo choices
    depend on local files (a checkpoint list) and are checked for type only.
    """
    errors: list[str] = []
    try:
        graph = _Graph(workflow, name)
    except WorkflowConversionError as error:
        return [str(error)]
    ignored = set(ignore_combo_inputs)
    cache: dict[str, NodeSchema | None] = {}

    for node_id, node in graph.nodes.items():
        node_type = node.get("type")
        if node_type in FRONTEND_ONLY_TYPES:
            continue
        schema = _schema(object_info, node_type, cache)
        if schema is None:
            errors.append(f"{name}: node {node_id}: node type {node_type!r} does not exist")
            continue

        values = widget_values_by_name(node, schema, name)
        linked = {socket["name"] for socket in node.get("inputs") or [] if socket.get("link") is not None}
        for input_name in schema.widget_slots:
            if input_name not in values:
                if require_all_values and input_name not in linked:
                    errors.append(f"{name}: node {node_id} ({node_type}): input {input_name!r} has no widget value")
                continue
            spec = schema.input(input_name)
            if (node_type, input_name) in ignored and spec.type == "COMBO":
                if not isinstance(values[input_name], str):
                    errors.append(f"{name}: node {node_id} ({node_type}): input {input_name!r} value "
                                  f"{values[input_name]!r} is not a string")
                continue
            problem = _check_value(spec, values[input_name])
            if problem:
                errors.append(f"{name}: node {node_id} ({node_type}): input {input_name!r} value "
                              f"{values[input_name]!r} {problem}")

        for socket in node.get("inputs") or []:
            spec = schema.input(socket["name"])
            if spec is None:
                errors.append(f"{name}: node {node_id} ({node_type}): input {socket['name']!r} does not exist")
            elif spec.required and not spec.is_widget and socket.get("link") is None:
                errors.append(f"{name}: node {node_id} ({node_type}): required input {socket['name']!r} "
                              "is not connected")
    return errors
