"""Watch delivery shared by the `ControlKV` implementations, and an iterator over a watch.

A watch's callback never runs on the thread that produced the event (a store's write path, a gRPC
stream reader): `EventDispatcher` queues events and delivers them in order on a named thread of
its own, so a slow callback delays only its own watch. `EventQueue` turns callbacks into `get`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from gemini_ckpt.coordination.control_kv import ErrorCallback, WatchCallback, WatchEvent

log = logging.getLogger(__name__)


class EventQueue:
    """Turns a watch into an iterator: pass `put` as the callback, then `get` the events."""

    def __init__(self) -> None:
        self._queue: queue.Queue[WatchEvent] = queue.Queue()

    def put(self, event: WatchEvent) -> None:
        """The watch callback."""
        self._queue.put(event)

    def get(self, timeout_s: float) -> WatchEvent | None:
        """The next event, or None if none arrived within `timeout_s`."""
        try:
            return self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def drain(self) -> list[WatchEvent]:
        """Every event delivered and not yet taken, without waiting."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events


class EventDispatcher:
    """Delivers events to a callback on a thread of its own, in the order they were pushed.

    Producers (a store's write path, a gRPC stream reader) `push` and never wait for the
    callback. `start()` starts the thread; `cancel()` stops it.
    """

    def __init__(self, name: str, callback: WatchCallback, on_error: ErrorCallback | None) -> None:
        self._callback = callback
        self._on_error = on_error
        self._queue: queue.Queue[WatchEvent | Exception | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._cancelled = threading.Event()

    def start(self) -> None:
        """Start the delivery thread."""
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called or a final error was delivered."""
        return self._cancelled.is_set()

    def push(self, event: WatchEvent) -> None:
        """Queue an event for delivery."""
        self._queue.put(event)

    def fail(self, error: Exception) -> None:
        """Queue the final error: `on_error` gets it after the events queued before it."""
        self._queue.put(error)

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Stop delivery; join the thread unless called from it."""
        self._cancelled.set()
        self._queue.put(None)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._cancelled.is_set():
            item = self._queue.get()
            if item is None or self._cancelled.is_set():
                return
            if isinstance(item, Exception):
                self._cancelled.set()
                if self._on_error is not None:
                    self._safely(self._on_error, item)
                return
            self._safely(self._callback, item)

    def _safely(self, fn: Callable[[WatchEvent], None] | ErrorCallback, item: object) -> None:
        try:
            fn(item)  # type: ignore[arg-type]
        except Exception:
            log.exception("watch callback on %s failed", self._thread.name)
