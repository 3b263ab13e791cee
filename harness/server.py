"""Run a real ComfyUI server on 127.0.0.1 for headless runs and browser tests.

``ComfyServer`` starts ComfyUI's ``main.py`` as a subprocess on a free
loopback port with its own base directory (models/, input/, output/ and
custom_nodes/ with this pack linked in), queues API-format prompts with
``POST /prompt``, polls ``GET /history/{id}`` and fetches files with
``GET /view``. It never listens on or talks to any other address.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .locate import PACK_ROOT

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PACK_FOLDER_NAME = "ComfyUI-LOCO"


class ServerError(RuntimeError):
    """The server failed to start, rejected a prompt or failed to run it."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def prepare_base_dir(base_dir: Path, extra_packs: dict[str, Path] | None = None) -> Path:
    """Create a ComfyUI base directory with this pack linked into custom_nodes.

    ``extra_packs`` maps further custom_nodes folder names to their source
    folders (the test-only node pack, for example).
    """
    base_dir = Path(base_dir)
    for name in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base_dir / name).mkdir(parents=True, exist_ok=True)

    packs = {PACK_FOLDER_NAME: PACK_ROOT, **(extra_packs or {})}
    for name, source in packs.items():
        link = base_dir / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(Path(source).resolve(), target_is_directory=True)
    return base_dir


class ComfyServer:
    """A ComfyUI server subprocess on 127.0.0.1; use as a context manager."""

    def __init__(self, comfy_root: Path, base_dir: Path, port: int | None = None,
                 python: str = sys.executable, extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 300.0, log_path: Path | None = None):
        self.comfy_root = Path(comfy_root)
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.python = python
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    # -- lifecycle ---------------------------------------------------------

    def command(self) -> list[str]:
        return [
            self.python, str(self.comfy_root / "main.py"),
            "--cpu", "--listen", HOST, "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--disable-auto-launch", "--disable-api-nodes",
            # The default database file would land in the ComfyUI checkout.
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        prepare_base_dir(self.base_dir)
        self._log_file = open(self.log_path, "wb")
        logger.info("starting ComfyUI at %s (log %s)", self.url, self.log_path)
        self.process = subprocess.Popen(
            self.command(), cwd=self.comfy_root, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"ComfyUI exited with code {self.process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=5)
                logger.info("ComfyUI is ready at %s", self.url)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not respond at {self.url} within {self.startup_timeout:.0f} s; "
                          f"last log lines:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server: SIGINT first (ComfyUI's clean exit), then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            logger.info("stopping ComfyUI at %s (pid %d)", self.url, self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("ComfyUI (pid %d) ignored SIGINT for %.0f s; killing it", self.process.pid, timeout)
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP --------------------------------------------------------------

    def _request(self, path: str, data: bytes | None = None, timeout: float = 60.0) -> bytes:
        request = urllib.request.Request(self.url + path, data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, payload: Any, timeout: float = 60.0) -> Any:
        body = self._request(path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(body) if body.strip() else None

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue_prompt(self, prompt: dict) -> str:
        """Queue an API-format prompt and return its prompt id.

        Raises ServerError with the server's node errors when it rejects the
        prompt, or when it accepts only part of it (ComfyUI then runs the
        valid outputs and reports the others in ``node_errors``).
        """
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ServerError(f"ComfyUI rejected the prompt ({error.code}): {detail}") from error
        if answer.get("node_errors"):
            raise ServerError(f"ComfyUI accepted only part of the prompt: {json.dumps(answer['node_errors'])}")
        return answer["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 900.0, poll: float = 0.5) -> dict:
        """Poll /history until the prompt finishes; return its history entry.

        Raises ServerError when the execution failed (with the node and the
        exception message) or did not finish within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    raise ServerError(f"prompt {prompt_id} failed: {_execution_error(status)}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        """Queue a prompt, wait for it and return its history entry."""
        return self.wait_for(self.queue_prompt(prompt), timeout=timeout)

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        return self._request(f"/view?{query}")

    def copy_to_input(self, *paths: Path) -> None:
        for path in paths:
            shutil.copy2(path, self.input_dir / Path(path).name)


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
    return json.dumps(status)


def start_server(comfy_root: Path, base_dir: Path, **kwargs) -> ComfyServer:
    """Start a ComfyServer and return it once it responds."""
    return ComfyServer(comfy_root, base_dir, **kwargs).start()

