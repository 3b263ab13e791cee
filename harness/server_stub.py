"""A stand-in for ComfyUI's PromptServer when prompts run in this process.

``execution.PromptExecutor`` talks to its server only through a few
attributes and ``send_sync``. This stub records every message so a test can
read the progress and status events a browser would have received.
"""

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

EventListener = Callable[[Any, Any], None]


class ServerStub:
    """The PromptServer attributes that ComfyUI 0.3.64's executor and progress handlers read."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        # The progress handler reads each client's feature flags here. No
        # client announces any, so binary previews take the legacy path.
        self.sockets_metadata: dict[str, dict] = {}
        self.events: list[tuple[Any, Any]] = []
        self.listener: EventListener | None = None

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        # event is a string for JSON messages and an int (BinaryEventTypes)
        # for binary ones such as preview images.
        self.events.append((event, data))
        if self.listener is not None:
            self.listener(event, data)

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def queue_updated(self) -> None:
        # There is no queue: run() executes one prompt at a time.
        pass

    def start_recording(self, listener: EventListener | None) -> None:
        self.events = []
        self.listener = listener

    def stop_recording(self) -> list[tuple[Any, Any]]:
        events = self.events
        self.events = []
        self.listener = None
        return events
