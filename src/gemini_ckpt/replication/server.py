"""The agent's replication endpoint: peers push replicas into it and fetch checkpoints from it.

One thread per connection, at most `max_connections` at once. Every connection starts with the
mutual handshake (`auth.py`) under a deadline; a peer that fails it is logged with its address and
the reason, and disconnected before a single checkpoint byte is read or written. After it, the
connection carries any number of requests, one at a time (see `receiver.py` and `provider.py`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gemini_ckpt.errors import ConfigError, ReplicationError
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.auth import Credentials, server_handshake
from gemini_ckpt.replication.provider import ReplicaProvider
from gemini_ckpt.replication.receiver import PushReceiver
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Where a replication server listens and how long it waits.

    Raises:
        ConfigError: a limit is not positive.
    """

    bind_host: str = "127.0.0.1"
    port: int = 0
    """0: any free port (see `ReplicaServer.address`)."""
    max_connections: int = 32
    handshake_timeout_s: float = 5.0
    io_timeout_s: float = 60.0
    """Any one send or receive within a request."""
    idle_timeout_s: float = 600.0
    """An authenticated connection with no request for this long is closed (peers reconnect)."""
    buffer_bytes: int = wire.SOCKET_BUFFER

    def __post_init__(self) -> None:
        limits = (self.max_connections, self.handshake_timeout_s, self.io_timeout_s)
        if min(limits) <= 0 or self.idle_timeout_s <= 0 or not 0 <= self.port < 65536:
            raise ConfigError(
                f"replication server settings out of range: {self} (every limit must be positive)"
            )


class ReplicaServer:
    """Serves replication for one agent.

    Pushes land in `replicas` when tagged with `current_generation()`; fetches are served from
    `replicas`, then from `own` if given. `start()` binds and starts accepting, `close()` stops
    and joins every thread; it is a context manager.
    """

    def __init__(
        self,
        credentials: Credentials,
        replicas: LocalStore,
        current_generation: Callable[[], int],
        own: LocalStore | None = None,
        settings: ServerSettings | None = None,
        on_corrupt: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.settings = settings or ServerSettings()
        self._credentials = credentials
        self._receiver = PushReceiver(credentials.job, replicas, current_generation, on_corrupt)
        self._provider = ReplicaProvider(replicas, own)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._refuse_until = 0.0

    @property
    def address(self) -> wire.Address:
        """The bound (host, port).

        Raises:
            ReplicationError: the server is not started.
        """
        if self._listener is None:
            raise ReplicationError("the replication server is not started")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> wire.Address:
        """Bind, listen and start accepting; return the bound address.

        Raises:
            ReplicationError: the address cannot be bound.
        """
        host, port = self.settings.bind_host, self.settings.port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise ReplicationError(f"cannot listen on {host}:{port}: {e}") from e
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit the buffer sizes (set before listen for the window).
            wire.tune(listener, self.settings.buffer_bytes)
            listener.bind((host, port))
            listener.listen(self.settings.max_connections)
        except OSError as e:
            listener.close()
            raise ReplicationError(f"cannot listen on {host}:{port}: {e}") from e
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="gemini-replica-accept", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "replication server of job %s listening on %s",
            self._credentials.job,
            wire.describe(self.address),
        )
        return self.address

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every connection (aborting pushes in flight), join the threads."""
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in [self._accept_thread, *conns.values()]:
            if thread is not None:
                thread.join(timeout_s)
        self._receiver.close()
        self._provider.close()

    def refuse_for(self, seconds: float) -> None:
        """Fault injection (a network partition): drop every connection for `seconds`.

        Open connections are shut down (pushes in flight are aborted) and new ones closed unread,
        so peers see an unreachable server until the time is up.
        """
        log.warning("replication server partitioned: dropping all connections for %g s", seconds)
        with self._lock:
            self._refuse_until = time.monotonic() + seconds
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> ReplicaServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            where = wire.describe(peer)
            with self._lock:
                if time.monotonic() < self._refuse_until:
                    conn.close()
                    continue
                if len(self._conns) >= self.settings.max_connections:
                    log.warning(
                        "refused a replication connection from %s: %d connections already open",
                        where,
                        len(self._conns),
                    )
                    conn.close()
                    continue
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, where),
                    name=f"gemini-replica-{where}",
                    daemon=True,
                )
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket, where: str) -> None:
        try:
            wire.tune(conn, self.settings.buffer_bytes)
            server_handshake(conn, self._credentials, self.settings.handshake_timeout_s)
        except (ReplicationError, OSError) as e:  # AuthenticationError or HandshakeBroken
            log.warning("refused a replication connection from %s: %s", where, e)
            self._forget(conn)
            return
        try:
            while not self._closed.is_set() and self._serve_one(conn, where):
                pass
        finally:
            self._forget(conn)

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
        wire.close_quietly(conn)

    def _serve_one(self, conn: socket.socket, where: str) -> bool:
        """Answer one request; False when the connection is over."""
        try:
            conn.settimeout(self.settings.idle_timeout_s)
            header = wire.recv_header(conn)
            if header is None:
                return False
            conn.settimeout(self.settings.io_timeout_s)
            self._dispatch(conn, where, header)
        except wire.WireError as e:
            log.warning("closing the replication connection from %s: %s", where, e)
            return False
        except TimeoutError:
            log.info("closing the replication connection from %s: idle or stalled", where)
            return False
        except OSError:
            return False  # the peer went away; a push in flight was aborted
        except Exception:
            log.exception("internal error serving %s; closing its connection", where)
            return False
        return True

    def _dispatch(self, conn: socket.socket, where: str, header: dict[str, Any]) -> None:
        if header.get("op") == "push":
            self._receiver.handle(conn, where, header)
        else:
            self._provider.handle(conn, where, header)
