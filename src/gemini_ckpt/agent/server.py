"""The agent's control socket: a Unix socket, one thread per trainer connection.

Only processes of the agent's own user may connect (checked with SO_PEERCRED). A malformed request
gets an error reply naming the problem and the connection stays usable; a byte stream that cannot be
split into frames gets an error reply and that connection is closed. Either way the agent keeps
serving every other trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import GeminiError, ProtocolError
from gemini_ckpt.protocol.framing import FramingBroken, recv_frame, send_frame
from gemini_ckpt.protocol.messages import Request, error_reply, ok_reply, parse_request

log = logging.getLogger(__name__)

Handler = Callable[[Request, Any], dict[str, Any]]


class InternalError(GeminiError):
    """An unexpected failure inside the agent while answering a request."""


class ControlServer:
    """Serves requests on `path`. `start()` binds and starts the accept thread; `close()` stops it.

    `handler(request, conn_state)` answers a request; `new_state(peer_pid)` makes the per-connection
    state
    and `on_close(conn_state)` is called when a connection ends.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        new_state: Callable[[int], Any],
        on_close: Callable[[Any], None],
    ) -> None:
        self._path = path
        self._handler = handler
        self._new_state = new_state
        self._on_close = on_close
        self._sock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> None:
        """Bind the socket (owner-only permissions) and start accepting."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._path.exists():
            self._path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self._path))
        os.chmod(self._path, 0o600)
        sock.listen(64)
        self._sock = sock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name="gemini-agent-accept", daemon=True
        )
        self._accept_thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection and join the threads."""
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in [self._accept_thread, *self._threads]:
            if thread is not None:
                thread.join(timeout_s)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            pid, uid = _peer(conn)
            if uid not in (os.getuid(), 0):
                log.warning("refused a control connection from user %d (pid %d)", uid, pid)
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve, args=(conn, pid), name="gemini-agent-conn", daemon=True
            )
            with self._lock:
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket, peer_pid: int) -> None:
        state = self._new_state(peer_pid)
        try:
            while not self._closed.is_set():
                if not self._serve_one(conn, state):
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._on_close(state)

    def _serve_one(self, conn: socket.socket, state: Any) -> bool:
        """Answer one frame; False when the connection is over."""
        try:
            message = recv_frame(conn)
        except FramingBroken as e:
            log.warning("closing a control connection: %s", e)
            if self._try_send(conn, error_reply(0, e)):
                _linger_close(conn)
            return False
        except ProtocolError as e:
            return self._try_send(conn, error_reply(0, e))
        except OSError:
            return False  # the trainer went away
        if message is None:
            return False
        raw_id = message.get("id", 0)
        request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else 0
        try:
            request = parse_request(message)
            reply = ok_reply(request.id, **self._handler(request, state))
        except GeminiError as e:
            reply = error_reply(request_id, e)
        except Exception as e:
            log.exception("internal error while answering a trainer")
            reply = error_reply(request_id, InternalError(f"{type(e).__name__}: {e}"))
        return self._try_send(conn, reply)

    @staticmethod
    def _try_send(conn: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            send_frame(conn, reply)
        except (OSError, ProtocolError):
            return False
        return True


def _linger_close(conn: socket.socket, drain_s: float = 0.5) -> None:
    """End our side and discard what the peer still sends, so it reads our reply, not a reset."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        while conn.recv(65536):
            pass
    except OSError:
        pass


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid, as the kernel reports them."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid
