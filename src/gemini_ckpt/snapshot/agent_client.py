"""The trainer's connection to its machine agent (a Unix socket carrying JSON frames)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from gemini_ckpt import errors
from gemini_ckpt.errors import AgentUnavailableError, ProtocolError, RemoteError
from gemini_ckpt.protocol.framing import encode_frame, recv_frame

# Agent-side errors that mean the same thing on this side are re-raised as their own class.
_LOCAL_CLASSES = {
    cls.__name__: cls
    for cls in (
        errors.MemoryBudgetError,
        errors.StoreError,
        errors.CorruptCheckpointError,
        errors.RecoveryError,
        errors.ProtocolError,
        errors.ConfigError,
    )
}


class AgentClient:
    """Request/reply client; thread-safe (one request at a time on the connection).

    `connect()` before use, `close()` after. Every request waits at most `timeout_s` for its reply.
    """

    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        self._path = socket_path
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._next_id = 0

    def connect(self, retry_for_s: float = 10.0) -> None:
        """Connect, retrying briefly while the agent comes up.

        Raises:
            AgentUnavailableError: nothing answers at the socket path within `retry_for_s`.
        """
        deadline = time.monotonic() + retry_for_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._path))
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise AgentUnavailableError(
                        f"cannot reach the Gemini agent at {self._path}: {e}"
                    ) from e
                time.sleep(0.05)
                continue
            sock.settimeout(self._timeout_s)
            self._sock = sock
            return

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the reply's fields.

        Raises:
            AgentUnavailableError: not connected, the connection broke, or the reply timed out.
            RemoteError: the agent answered with an error (or a local subclass for known kinds).
        """
        with self._lock:
            if self._sock is None:
                raise AgentUnavailableError("not connected to the Gemini agent")
            self._next_id += 1
            request_id = self._next_id
            frame = encode_frame({"op": op, "id": request_id, **fields})
            try:
                self._sock.sendall(frame)
                reply = recv_frame(self._sock)
            except (OSError, ProtocolError) as e:
                # A late reply would answer the next request: this connection is done.
                self._sock.close()
                self._sock = None
                what = "no reply within the request timeout" if isinstance(e, TimeoutError) else e
                raise AgentUnavailableError(
                    f"request {op!r} to the Gemini agent failed: {what}"
                ) from e
        if reply is None:
            raise AgentUnavailableError(f"the Gemini agent closed the connection during {op!r}")
        if reply.get("id") != request_id:
            raise ProtocolError(f"reply id {reply.get('id')!r} does not match request {request_id}")
        if not reply.get("ok"):
            error = reply.get("error") or {}
            kind, message = str(error.get("kind", "Error")), str(error.get("message", ""))
            local = _LOCAL_CLASSES.get(kind)
            raise local(message) if local else RemoteError(kind, message)
        return reply

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
