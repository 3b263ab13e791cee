"""Run API-format prompts through a real ComfyUI inside this Python process.

``ComfySession`` imports the ComfyUI checkout that ``harness.locate`` finds
and gives it a temporary base directory: models/, input/, output/, temp/,
user/ and custom_nodes/, where this repository is linked in as
``ComfyUI-LOCO`` and the test-only node pack as ``loco_testing_nodes``. It
loads every node the way ComfyUI's ``main.py`` does and executes prompts
with ``execution.validate_prompt`` and ``execution.PromptExecutor``, as the
server's prompt worker does. Facts about ComfyUI in this module were read
from, and run against, ComfyUI 0.3.64.

ComfyUI keeps its configuration in module globals (``comfy.cli_args.args``,
``folder_paths``, ``nodes.NODE_CLASS_MAPPINGS``), so a process can start
one session only. A run that a node fails raises ``PromptExecutionError``
and an interrupted run raises its subclass ``PromptInterruptedError``.

Example::

    with ComfySession() as session:
        result = session.run({
            "1": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        }, targets=["1"])
        latent = result.values("1")[0]["samples"]
"""

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness.locate import PACK_ROOT, find_comfyui
from harness.server_stub import ServerStub

logger = logging.getLogger(__name__)

PACK_FOLDER_NAME = "ComfyUI-LOCO"
TEST_NODES_FOLDER_NAME = "loco_testing_nodes"
TEST_NODES_SOURCE = PACK_ROOT / "tests" / "comfy" / "testing_nodes"

# The executor sends progress and status events only when the prompt names a
# client, so every run names this one and the stub records what it is sent.
HARNESS_CLIENT_ID = "loco-harness"

MODEL_FOLDERS = (
    "checkpoints", "clip", "clip_vision", "configs", "controlnet", "diffusion_models", "embeddings",
    "loras", "text_encoders", "unet", "upscale_models", "vae", "vae_approx",
)

# Top-level module names of ComfyUI that another checkout or this repository
# could shadow, because the pack's own ``nodes`` package has the same name as
# ComfyUI's ``nodes.py``.
COMFYUI_TOP_LEVEL_MODULES = ("nodes", "execution", "server", "folder_paths", "utils", "comfy")

# The session that configured ComfyUI in this process, also after it closed.
_process_session: "ComfySession | None" = None


class ComfyUINotFoundError(RuntimeError):
    """No ComfyUI checkout was found. The message names the places searched."""


class ComfyUIImportError(RuntimeError):
    """ComfyUI could not be imported in this process as the harness needs it."""


class CustomNodeImportError(RuntimeError):
    """ComfyUI reported that a custom node folder failed to load."""


class PromptValidationError(ValueError):
    """``execution.validate_prompt`` rejected the prompt.

    ``node_errors`` maps node id to ComfyUI's error record (``errors``,
    ``class_type``). ``error`` is the prompt-level record or None.
    """

    def __init__(self, message: str, error: dict | None, node_errors: dict):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class PromptExecutionError(RuntimeError):
    """A node raised while the prompt ran.

    The original exception is chained as ``__cause__`` and kept in
    ``original`` when ComfyUI handed it over.
    """

    def __init__(self, message: str, node_id: str | None, node_type: str | None,
                 exception_type: str | None = None, exception_message: str | None = None,
                 traceback_lines: list[str] | None = None, original: BaseException | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback_lines = traceback_lines or []
        self.original = original


class PromptInterruptedError(PromptExecutionError):
    """The prompt stopped at ComfyUI's interrupt flag (``session.interrupt()``)."""


@dataclass
class RunResult:
    """Result of one ``ComfySession.run``.

    ``ui`` is the history's ``outputs`` (node id to the node's UI dict, such
    as ``{"images": [...]}``). ``executed`` contains the nodes that ran in this
    prompt and ``cached`` the needed nodes whose outputs came from an earlier
    prompt. Needed are the output nodes (or targets) and the nodes upstream
    of them, and only those have ``values``.
    ``events`` lists every ``(event, data)`` message the server was sent.
    """

    prompt_id: str
    prompt: dict
    ui: dict[str, dict]
    executed: set[str]
    cached: set[str]
    events: list[tuple[Any, Any]]
    outputs: dict[str, list[list]] = field(repr=False)
    output_is_list: dict[str, tuple[bool, ...]] = field(repr=False)

    def value_lists(self, node_id: str | int) -> tuple[list, ...]:
        """Return the node's outputs as ComfyUI caches them: one list per output slot.

        Each list has one entry per call of the node's function (one call
        unless a list input made ComfyUI call it once per item) or the items
        of an output declared as a list.
        """
        key = str(node_id)
        if key not in self.outputs:
            raise KeyError(
                f"node {key} has no cached outputs in prompt {self.prompt_id}; nodes with outputs: "
                f"{sorted(self.outputs)}. Only nodes upstream of an output node or a run() target execute."
            )
        return tuple(self.outputs[key])

    def values(self, node_id: str | int) -> tuple:
        """Return the node's output values, one per output slot.

        A slot is the value itself when the node ran once. It is a list when
        the output is declared as a list or the node ran once per item of a
        list input.
        """
        slots = self.value_lists(node_id)
        is_list = self.output_is_list.get(str(node_id), ())
        values = []
        for index, slot in enumerate(slots):
            declared_list = index < len(is_list) and is_list[index]
            if declared_list or len(slot) != 1:
                values.append(list(slot))
            else:
                values.append(slot[0])
        return tuple(values)


def _put_comfyui_first_on_sys_path(root: Path) -> None:
    # ComfyUI's main.py runs with its root as the script folder, so its
    # modules import each other as top-level names (nodes, execution,
    # folder_paths). Putting the root first on sys.path reproduces that and
    # makes ComfyUI's nodes.py win over this pack's nodes/ package.
    root_text = str(root)
    sys.path[:] = [entry for entry in sys.path if entry != root_text]
    sys.path.insert(0, root_text)


def _module_locations(module) -> list[Path]:
    # ComfyUI's comfy/ and comfy_execution/ are namespace packages with no
    # __file__, only a __path__ list.
    file = getattr(module, "__file__", None)
    if file:
        return [Path(file).resolve()]
    return [Path(entry).resolve() for entry in getattr(module, "__path__", [])]


def _check_no_shadowing_modules(root: Path) -> None:
    root = root.resolve()
    for name in COMFYUI_TOP_LEVEL_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        locations = _module_locations(module)
        if any(root in location.parents for location in locations):
            continue
        location_text = ", ".join(str(location) for location in locations) or "an unknown place"
        raise ComfyUIImportError(
            f"module '{name}' was imported from {location_text} before ComfyUI, which shadows ComfyUI's own "
            f"'{name}' in {root}. Start the ComfySession before importing it; import the pack's node "
            "modules only through ComfyUI (the pack's nodes/ package has the name of ComfyUI's nodes.py)."
        )


def _configure_comfyui_args(base_dir: Path, cpu: bool) -> None:
    cli_args = importlib.import_module("comfy.cli_args")
    args = cli_args.args
    args.cpu = cpu
    args.base_directory = str(base_dir)
    args.disable_api_nodes = True
    args.disable_auto_launch = True
    args.auto_launch = False


def _import_comfyui_modules() -> SimpleNamespace:
    # Same order as ComfyUI's main.py. utils.extra_config must come before
    # nodes: nodes.py puts ComfyUI/comfy at the front of sys.path, after
    # which a first "import utils" finds comfy/utils.py instead of ComfyUI's
    # utils package, and server.py's "from utils.install_util import ..." fails.
    names = [
        "utils.extra_config", "folder_paths", "comfy.utils", "comfy.model_management", "execution",
        "server", "nodes", "hook_breaker_ac10a0", "comfy_execution.progress", "comfy_execution.utils",
    ]
    modules = {}
    for name in names:
        modules[name.replace(".", "_")] = importlib.import_module(name)
    return SimpleNamespace(**modules)


def _repository_package_names() -> set[str]:
    return {entry.name for entry in PACK_ROOT.iterdir() if (entry / "__init__.py").is_file()}


@contextlib.contextmanager
def _pack_loaded_as_in_an_install():
    """Hide this repository from absolute imports while ComfyUI loads the custom nodes.

    pytest puts the repository root on sys.path, where ``import loco_core``
    succeeds. In a ComfyUI install the pack is loaded by path and only
    relative imports (``from ..loco_core import x``) work, so the root and
    the modules already imported from it are taken away for the load and
    put back afterwards.
    """
    pack_root = PACK_ROOT.resolve()
    removed_entries = [(index, entry) for index, entry in enumerate(sys.path)
                       if Path(entry or os.getcwd()).resolve() == pack_root]
    for _, entry in reversed(removed_entries):
        sys.path.remove(entry)

    package_names = _repository_package_names()
    hidden_modules = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in package_names:
            continue
        locations = _module_locations(module)
        if locations and all(pack_root in location.parents for location in locations):
            hidden_modules[name] = sys.modules.pop(name)

    try:
        yield
    finally:
        for index, entry in removed_entries:
            sys.path.insert(min(index, len(sys.path)), entry)
        sys.modules.update(hidden_modules)


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _upstream_nodes(prompt: Mapping[str, Mapping], outputs: Iterable[str]) -> set[str]:
    """Return the output nodes and every node they depend on through links."""
    needed: set[str] = set()
    pending = [str(node_id) for node_id in outputs]
    while pending:
        node_id = pending.pop()
        if node_id in needed or node_id not in prompt:
            continue
        needed.add(node_id)
        for value in prompt[node_id].get("inputs", {}).values():
            # A link is [source node id, output index].
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                pending.append(str(value[0]))
    return needed


def _format_validation_error(error: dict | None, node_errors: Mapping[str, dict]) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": "))
    for node_id, info in node_errors.items():
        for reason in info.get("errors", []):
            input_name = reason.get("extra_info", {}).get("input_name")
            where = f"node {node_id} ({info.get('class_type')})"
            if input_name:
                where += f" input '{input_name}'"
            lines.append(f"{where}: {reason.get('message')}: {reason.get('details')}")
    return "prompt failed validation:\n  " + "\n  ".join(lines)


class ComfySession:
    """A real ComfyUI loaded in this process, with this pack installed in a temporary base directory.

    Parameters:
        comfyui_root: ComfyUI checkout; default ``harness.locate.find_comfyui()``.
        base_dir: base directory for ComfyUI; default a new temporary folder
            that ``close()`` deletes.
        cpu: run ComfyUI with ``--cpu`` (True) or let it pick the accelerator.
        include_test_nodes: link ``tests/comfy/testing_nodes`` in as
            ``loco_testing_nodes``.
        extra_custom_nodes: further folders to link into custom_nodes/, by
            folder name.

    ``start()`` raises ``ComfyUINotFoundError`` without a checkout and
    ``CustomNodeImportError`` when a linked folder fails to load.
    """

    def __init__(self, comfyui_root: Path | str | None = None, base_dir: Path | str | None = None,
                 cpu: bool = True, include_test_nodes: bool = True,
                 extra_custom_nodes: Mapping[str, Path | str] | None = None):
        self._requested_root = Path(comfyui_root) if comfyui_root is not None else None
        self._requested_base_dir = Path(base_dir) if base_dir is not None else None
        self._cpu = cpu
        self._custom_node_links: dict[str, Path] = {PACK_FOLDER_NAME: PACK_ROOT}
        if include_test_nodes:
            self._custom_node_links[TEST_NODES_FOLDER_NAME] = TEST_NODES_SOURCE
        for name, path in (extra_custom_nodes or {}).items():
            self._custom_node_links[name] = Path(path)

        self.comfyui_root: Path | None = None
        self.base_dir: Path | None = None
        self.builtin_import_failures: list[str] = []
        self.custom_node_results: dict[str, bool] = {}
        self._owns_base_dir = False
        self._comfy: SimpleNamespace | None = None
        self._server = ServerStub()
        self._executor = None
        self._run_lock = threading.Lock()
        self._started = False
        self._closed = False

    # Folders ------------------------------------------------------------

    @property
    def input_dir(self) -> Path:
        return self._require_base_dir() / "input"

    @property
    def output_dir(self) -> Path:
        return self._require_base_dir() / "output"

    @property
    def models_dir(self) -> Path:
        return self._require_base_dir() / "models"

    @property
    def temp_dir(self) -> Path:
        return self._require_base_dir() / "temp"

    @property
    def custom_nodes_dir(self) -> Path:
        return self._require_base_dir() / "custom_nodes"

    def _require_base_dir(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("the ComfySession has no base directory yet; call start() first")
        return self.base_dir

    # Life cycle ---------------------------------------------------------

    def __enter__(self) -> "ComfySession":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> "ComfySession":
        """Import ComfyUI, lay out the base directory and load all nodes. Returns self."""
        global _process_session
        if self._started:
            return self
        if self._closed:
            raise RuntimeError("the ComfySession is closed; a closed session cannot start again")
        if _process_session is not None:
            raise RuntimeError(
                f"ComfyUI was already started in this process (base directory {_process_session.base_dir}). "
                "ComfyUI keeps its configuration in module globals, so a process can start it once: reuse "
                "that session (the pytest fixture 'comfy' is session-scoped) or start another process"
            )

        self.comfyui_root = self._find_root()
        try:
            self._make_base_dir()
            self._import_comfyui()
            self._install_server_hooks()
            self._load_nodes()
            self._executor = self._make_executor()
        except BaseException:
            self.close()
            raise

        self._started = True
        logger.info("ComfyUI from %s started in process; base directory %s", self.comfyui_root, self.base_dir)
        return self

    def close(self) -> None:
        """Unload models and delete the temporary base directory.

        ComfyUI stays imported, so no further session can start in this process.
        """
        if self._closed:
            return
        self._closed = True
        if self._comfy is not None:
            self._comfy.comfy_model_management.unload_all_models()
        if self._owns_base_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _find_root(self) -> Path:
        if self._requested_root is not None:
            return self._requested_root.resolve()
        root, reason = find_comfyui()
        if root is None:
            raise ComfyUINotFoundError(reason)
        return root

    def _make_base_dir(self) -> None:
        if self._requested_base_dir is not None:
            self.base_dir = Path(os.path.abspath(self._requested_base_dir))
            self.base_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.base_dir = Path(os.path.abspath(tempfile.mkdtemp(prefix="loco-comfyui-")))
            self._owns_base_dir = True

        for folder in ("input", "output", "temp", "user", "custom_nodes"):
            (self.base_dir / folder).mkdir(exist_ok=True)
        for folder in MODEL_FOLDERS:
            (self.base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)

        for name, source in self._custom_node_links.items():
            if not (source / "__init__.py").is_file():
                raise FileNotFoundError(f"custom node folder {source} for '{name}' has no __init__.py")
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                if link.resolve() != source.resolve():
                    raise FileExistsError(f"{link} exists and does not point to {source}; use another base_dir")
                continue
            link.symlink_to(source.resolve(), target_is_directory=True)

    def _import_comfyui(self) -> None:
        root = self.comfyui_root
        _put_comfyui_first_on_sys_path(root)
        _check_no_shadowing_modules(root)

        folder_paths = sys.modules.get("folder_paths")
        if folder_paths is not None and os.path.abspath(folder_paths.base_path) != str(self.base_dir):
            raise ComfyUIImportError(
                f"ComfyUI's folder_paths was already imported with base path {folder_paths.base_path}; "
                "the base directory is fixed at import, so start the ComfySession before importing ComfyUI"
            )

        global _process_session
        _process_session = self

        # comfy.cli_args parses no command line unless comfy.options enables
        # it (main.py does), so pytest's own arguments are left alone and the
        # settings are written into its args object before folder_paths and
        # model_management read them at import.
        _configure_comfyui_args(self.base_dir, self._cpu)
        self._comfy = _import_comfyui_modules()

    def _install_server_hooks(self) -> None:
        comfy = self._comfy
        # Some core nodes (GetImageSize) send text through PromptServer.instance.
        if getattr(comfy.server.PromptServer, "instance", None) is None:
            comfy.server.PromptServer.instance = self._server
        # The server's main.py installs this hook: it makes every ProgressBar
        # update an interrupt point and a progress event.
        comfy.comfy_utils.set_progress_bar_global_hook(self._progress_hook)

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None) -> None:
        context = self._comfy.comfy_execution_utils.get_executing_context()
        if prompt_id is None and context is not None:
            prompt_id = context.prompt_id
        if node_id is None and context is not None:
            node_id = context.node_id
        self._comfy.comfy_model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or self._server.last_prompt_id
        node_id = node_id or self._server.last_node_id

        self._comfy.comfy_execution_progress.get_progress_state().update_progress(
            node_id, value, total, preview_image
        )
        progress = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        self._server.send_sync("progress", progress, self._server.client_id)

    def _load_nodes(self) -> None:
        nodes = self._comfy.nodes
        hook_breaker = self._comfy.hook_breaker_ac10a0
        outcomes: dict[str, bool] = {}
        messages_by_path: dict[str, list[str]] = {}
        capture = _LogCapture()
        original_loader = nodes.load_custom_node

        # init_external_custom_nodes only logs "(IMPORT FAILED)" and goes on,
        # so the harness wraps the loader to see each folder's result and the
        # warnings (with traceback) logged while that folder loaded.
        async def recording_loader(module_path, *args, **kwargs):
            first_message = len(capture.messages)
            loaded = await original_loader(module_path, *args, **kwargs)
            outcomes[os.path.abspath(module_path)] = loaded
            messages_by_path[os.path.abspath(module_path)] = capture.messages[first_message:]
            return loaded

        root_logger = logging.getLogger()
        root_logger.addHandler(capture)
        hook_breaker.save_functions()
        nodes.load_custom_node = recording_loader
        try:
            with _pack_loaded_as_in_an_install():
                failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        finally:
            nodes.load_custom_node = original_loader
            hook_breaker.restore_functions()
            root_logger.removeHandler(capture)

        self.builtin_import_failures = list(failed or [])
        if self.builtin_import_failures:
            logger.warning("ComfyUI core node files that failed to import (missing optional packages): %s",
                           ", ".join(self.builtin_import_failures))
        self._check_custom_nodes_loaded(outcomes, messages_by_path)

    def _check_custom_nodes_loaded(self, outcomes: Mapping[str, bool],
                                   messages_by_path: Mapping[str, list[str]]) -> None:
        problems = []
        for name in self._custom_node_links:
            path = os.path.abspath(self.custom_nodes_dir / name)
            self.custom_node_results[name] = outcomes.get(path, False)
            if path not in outcomes:
                problems.append(f"{name}: ComfyUI did not try to load {path}")
            elif not outcomes[path]:
                details = "\n".join(messages_by_path.get(path, [])) or "(ComfyUI logged no reason)"
                problems.append(f"{name}: ComfyUI reported IMPORT FAILED for {path}:\n{details}")
        if problems:
            message = "custom node folders failed to load:\n" + "\n".join(problems)
            absolute_imports = [name for name in sorted(_repository_package_names())
                                if f"No module named '{name}" in message]
            if absolute_imports:
                message += (
                    f"\nThe pack imports {', '.join(absolute_imports)} as a top-level package. ComfyUI loads "
                    "the pack by path, without the repository root on sys.path, so modules inside the pack "
                    "must import each other relatively (from ..loco_core import x)."
                )
            raise CustomNodeImportError(message)

    def _make_executor(self):
        execution = self._comfy.execution

        class RecordingPromptExecutor(execution.PromptExecutor):
            """PromptExecutor that keeps the exception of the node that failed."""

            last_exception: BaseException | None = None

            def handle_execution_error(self, prompt_id, prompt, current_outputs, executed, error, ex):
                self.last_exception = ex
                super().handle_execution_error(prompt_id, prompt, current_outputs, executed, error, ex)

        # CLASSIC is the server's default cache: outputs of unchanged nodes
        # are reused by later prompts, as in a running ComfyUI.
        return RecordingPromptExecutor(self._server, cache_type=execution.CacheType.CLASSIC)

    # Queries and control ------------------------------------------------

    def node_types(self) -> set[str]:
        """Return the ids of all registered node types."""
        self._require_started()
        return set(self._comfy.nodes.NODE_CLASS_MAPPINGS)

    def node_class(self, node_type: str) -> type:
        """Return the registered class of a node type."""
        self._require_started()
        mapping = self._comfy.nodes.NODE_CLASS_MAPPINGS
        if node_type not in mapping:
            raise KeyError(f"node type {node_type!r} is not registered; see node_types()")
        return mapping[node_type]

    def interrupt(self) -> None:
        """Set ComfyUI's interrupt flag, as the server's /interrupt route does.

        The running prompt stops at its next interrupt point and ``run``
        raises ``PromptInterruptedError``. Call it from another thread or
        from an ``on_event`` callback: the executor clears the flag when a
        prompt starts, so a flag set before ``run`` has no effect.
        """
        self._require_started()
        self._comfy.comfy_model_management.interrupt_current_processing(True)

    def clear_cache(self) -> None:
        """Drop the executor's cached outputs, so the next prompt runs every node."""
        self._require_started()
        self._executor.reset()

    def _require_started(self) -> None:
        if self._closed:
            raise RuntimeError("the ComfySession is closed")
        if not self._started:
            raise RuntimeError("the ComfySession is not started; call start() or use it as a context manager")

    # Running prompts ----------------------------------------------------

    def run(self, prompt: Mapping[str, Mapping], targets: Iterable[str | int] | None = None,
            on_event: Callable[[Any, Any], None] | None = None,
            extra_data: Mapping[str, Any] | None = None) -> RunResult:
        """Validate and execute an API-format prompt; return its RunResult.

        Without ``targets`` ComfyUI's own rule applies and every output node
        runs. Any node that fails validation fails the whole run, although
        the server would still run the outputs that passed. ``targets`` names
        the nodes to execute instead, and they need not be output nodes.
        ``on_event(event, data)`` is called for every server message during
        the run, in the executing thread. ``extra_data`` is merged into the
        executor's extra_data (``extra_pnginfo`` for example). Outputs of
        unchanged nodes are reused from earlier runs, as in a running
        ComfyUI; ``clear_cache()`` drops them.

        Raises PromptValidationError or PromptExecutionError
        (PromptInterruptedError after ``interrupt()``).
        """
        self._require_started()
        prompt = self._copy_prompt(prompt)
        prompt_id = str(uuid.uuid4())
        target_ids = None if targets is None else [str(target) for target in targets]

        # One executor serves the session and it runs one prompt at a time,
        # like the server's prompt worker.
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError("run() is already executing a prompt in this session; "
                               "call it again after that prompt ends, not from on_event or another thread")
        try:
            outputs = asyncio.run(self._validate(prompt_id, prompt, target_ids))
            events = self._execute(prompt_id, prompt, outputs, on_event, extra_data)
            self._raise_if_failed(prompt)
            return self._collect_result(prompt_id, prompt, outputs, events)
        finally:
            self._run_lock.release()

    @staticmethod
    def _copy_prompt(prompt: Mapping[str, Mapping]) -> dict:
        # The executor keeps references into the prompt, and inputs may hold
        # lists, so each node and its inputs are copied; node ids become strings.
        copied = {}
        for node_id, node in prompt.items():
            if not isinstance(node, Mapping):
                raise PromptValidationError(
                    f"prompt node {node_id!r} is {type(node).__name__}, expected a dict with "
                    "'class_type' and 'inputs'", None, {})
            node_copy = dict(node)
            node_copy["inputs"] = {name: list(value) if isinstance(value, list) else value
                                   for name, value in dict(node.get("inputs", {})).items()}
            copied[str(node_id)] = node_copy
        return copied

    async def _validate(self, prompt_id: str, prompt: dict, targets: list[str] | None) -> list[str]:
        execution = self._comfy.execution
        if targets is None:
            valid, error, good_outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
            if not valid or node_errors:
                raise PromptValidationError(_format_validation_error(error, node_errors), error, node_errors)
            return list(good_outputs)

        self._check_node_types(prompt)
        validated: dict = {}
        for target in targets:
            if target not in prompt:
                raise PromptValidationError(
                    f"target node {target} is not in the prompt (node ids: {sorted(prompt)})", None, {})
            await execution.validate_inputs(prompt_id, prompt, target, validated)

        node_errors = {}
        for node_id, (valid, reasons, _) in validated.items():
            if valid is not True and reasons:
                node_errors[node_id] = {"errors": reasons, "class_type": prompt[node_id]["class_type"]}
        if node_errors:
            raise PromptValidationError(_format_validation_error(None, node_errors), None, node_errors)
        return targets

    def _check_node_types(self, prompt: dict) -> None:
        mapping = self._comfy.nodes.NODE_CLASS_MAPPINGS
        for node_id, node in prompt.items():
            class_type = node.get("class_type")
            if class_type is None:
                raise PromptValidationError(f"node {node_id} has no 'class_type'", None, {})
            if class_type not in mapping:
                raise PromptValidationError(
                    f"node {node_id}: node type {class_type!r} is not registered", None, {})

    def _execute(self, prompt_id: str, prompt: dict, outputs: list[str],
                 on_event: Callable[[Any, Any], None] | None,
                 extra_data: Mapping[str, Any] | None) -> list[tuple[Any, Any]]:
        run_extra_data = {"client_id": HARNESS_CLIENT_ID}
        run_extra_data.update(extra_data or {})
        self._executor.last_exception = None
        self._server.last_prompt_id = prompt_id
        self._server.start_recording(on_event)
        try:
            self._executor.execute(prompt, prompt_id, run_extra_data, outputs)
        finally:
            events = self._server.stop_recording()
        return events

    def _raise_if_failed(self, prompt: dict) -> None:
        messages = self._executor.status_messages
        if any(event == "execution_success" for event, _ in messages):
            return

        original = self._executor.last_exception
        for event, data in messages:
            if event == "execution_interrupted":
                node_id = data.get("node_id")
                node_type = data.get("node_type")
                raise PromptInterruptedError(
                    f"prompt interrupted at node {node_id} ({node_type})", node_id, node_type,
                    original=original) from original
            if event == "execution_error":
                node_id = data.get("node_id")
                node_type = data.get("node_type")
                exception_type = data.get("exception_type")
                exception_message = str(data.get("exception_message", "")).strip()
                raise PromptExecutionError(
                    f"node {node_id} ({node_type}) raised {exception_type}: {exception_message}",
                    node_id, node_type, exception_type, exception_message,
                    data.get("traceback"), original) from original

        raise PromptExecutionError(
            f"prompt ended without success and without an error message; status messages: {messages}",
            None, None, original=original)

    def _collect_result(self, prompt_id: str, prompt: dict, outputs: list[str],
                        events: list[tuple[Any, Any]]) -> RunResult:
        # The output cache also answers for nodes of this prompt that an
        # earlier prompt computed but this one did not need, so only the
        # requested outputs and their upstream nodes are read.
        needed = _upstream_nodes(prompt, outputs)
        caches = self._executor.caches
        mapping = self._comfy.nodes.NODE_CLASS_MAPPINGS
        values = {}
        output_is_list = {}
        for node_id in sorted(needed):
            cached = caches.outputs.get(node_id)
            if cached is None:
                continue
            values[node_id] = [list(slot) for slot in cached]
            declared = getattr(mapping[prompt[node_id]["class_type"]], "OUTPUT_IS_LIST", None)
            output_is_list[node_id] = tuple(bool(flag) for flag in (declared or ()))

        executed = set()
        cached_nodes = set()
        for event, data in events:
            if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
                executed.add(str(data["node"]))
            elif event == "execution_cached" and isinstance(data, dict):
                cached_nodes.update(str(node_id) for node_id in data.get("nodes", []))

        history = getattr(self._executor, "history_result", {}) or {}
        return RunResult(
            prompt_id=prompt_id,
            prompt=prompt,
            ui=dict(history.get("outputs", {})),
            executed=executed,
            cached=cached_nodes & needed,
            events=events,
            outputs=values,
            output_is_list=output_is_list,
        )
