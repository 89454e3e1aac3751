"""Opening an authenticated connection to a peer agent, and one request-reply exchange on it."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from gemini_ckpt.errors import ConfigError, ReplicationError
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.auth import (
    AuthenticationError,
    Credentials,
    HandshakeBroken,
    client_handshake,
)


@dataclass(frozen=True)
class Timeouts:
    """How long a replication client waits.

    Raises:
        ConfigError: a timeout is not positive.
    """

    connect_s: float = 5.0
    """TCP connect plus the authentication handshake."""
    io_s: float = 60.0
    """Any one send or receive once connected (a peer that stops reading or answering)."""

    def __post_init__(self) -> None:
        if self.connect_s <= 0 or self.io_s <= 0:
            raise ConfigError(
                f"replication timeouts must be positive, got connect {self.connect_s} s and "
                f"i/o {self.io_s} s"
            )


def connect(
    endpoint: wire.Endpoint,
    credentials: Credentials,
    timeouts: Timeouts,
    buffer_bytes: int = wire.SOCKET_BUFFER,
) -> socket.socket:
    """An authenticated connection to the replication server at `endpoint`.

    The socket buffers are sized before connecting (the TCP window scale is agreed then).

    Raises:
        AuthenticationError: the server refused our proof or could not prove its own.
        ReplicationError: the peer cannot be reached, or the connection broke during the
            handshake, or `endpoint` is malformed; the message names the address.
    """
    address = wire.parse_address(endpoint)
    where = wire.describe(address)
    try:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
    except OSError as e:
        raise ReplicationError(f"peer {where} is unreachable: {e}") from e
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            wire.tune(sock, buffer_bytes)
            sock.settimeout(timeouts.connect_s)
            sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        return _authenticate(sock, where, credentials, timeouts)
    raise ReplicationError(f"peer {where} is unreachable: {last}")


def _authenticate(
    sock: socket.socket, where: str, credentials: Credentials, timeouts: Timeouts
) -> socket.socket:
    try:
        client_handshake(sock, credentials, timeouts.connect_s)
    except AuthenticationError as e:
        wire.close_quietly(sock)
        raise AuthenticationError(f"peer {where}: {e}") from e
    except (HandshakeBroken, OSError) as e:
        wire.close_quietly(sock)
        raise ReplicationError(
            f"peer {where} is unreachable: the connection broke while authenticating: {e}"
        ) from e
    sock.settimeout(timeouts.io_s)
    return sock


def call(
    sock: socket.socket,
    where: str,
    header: dict[str, Any],
    payload: bytes | memoryview | None = None,
) -> dict[str, Any]:
    """Send one request and return its successful reply header (a payload may follow it).

    Raises:
        ReplicationError: the peer refused the request (its reason in the message).
        WireError: the reply cannot be read as a message, or the connection closed.
        OSError: the connection broke or timed out.
    """
    wire.send(sock, header, payload)
    return expect_ok(sock, where, str(header.get("op")))


def expect_ok(sock: socket.socket, where: str, what: str) -> dict[str, Any]:
    """Receive a reply header and return it if it says ok.

    Raises:
        ReplicationError: the peer refused (its reason in the message).
        WireError: the reply cannot be read as a message, or the connection closed.
        OSError: the connection broke or timed out.
    """
    reply = wire.recv_header(sock)
    if reply is None:
        raise wire.WireError(f"peer {where} closed the connection before answering {what}")
    if reply.get("ok") is not True:
        raise ReplicationError(f"peer {where} refused {what}: {str(reply.get('error'))[:1000]}")
    return reply
