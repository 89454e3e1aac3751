"""Messages between agents: a length-prefixed JSON header, then as many payload bytes as it states.

A header is a 4-byte big-endian length and a UTF-8 JSON object (the same prefix as
`protocol/framing.py`, with much tighter bounds because a peer on the network is less trusted than a
local trainer). A header with a `"payload"` field is followed by exactly that many raw bytes: a
manifest, or one checkpoint chunk. Payloads move with `sendall(memoryview)` straight from the
source slot's mapping and `recv_into` straight into the destination slot's: no copy in user space.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from typing import Any

import xxhash

from gemini_ckpt.errors import ReplicationError

Address = tuple[str, int]
"""A peer agent's replication endpoint: (host, port)."""
Endpoint = Address | str
"""An `Address`, or the same as "host:port" text (as membership records carry it)."""

PROTOCOL = "gemini-replication/1"
MAX_HEADER = 1 << 20
"""Largest header after the handshake (headers carry small fields; manifests go as payloads)."""
HANDSHAKE_MAX_HEADER = 4096
"""Largest header before a peer has proved it knows the job secret."""
MAX_MANIFEST = 64 << 20
"""Largest manifest payload accepted (the trainer-agent frame limit, for the same manifests)."""
HASH_PIECE = 256 << 10
"""Bytes received before they are hashed: they are still in the CPU's cache."""
SOCKET_BUFFER = 4 << 20
"""Send and receive buffer per connection: a few chunks in flight keep a fast link busy."""
_PREFIX = struct.Struct(">I")


class WireError(ReplicationError):
    """The byte stream cannot be read as messages any more; the connection must be closed."""


def parse_address(endpoint: Endpoint) -> Address:
    """(host, port) from an `Address` or "host:port" text ("[::1]:7000" for IPv6).

    Raises:
        ReplicationError: the text has no port or the port is not a number in 0..65535.
    """
    if isinstance(endpoint, tuple):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ReplicationError(f"replication address {endpoint!r} is not host:port")
    return host, int(port)


def describe(address: Address | Any) -> str:
    """`host:port` for logs and errors (anything else as `str`)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def tune(sock: socket.socket, buffer_bytes: int = SOCKET_BUFFER) -> None:
    """Disable Nagle (a header must not wait for the previous payload's ACK) and size the buffers.

    `buffer_bytes` 0 leaves the kernel's auto-tuning in charge.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


def encode_header(header: dict[str, Any], limit: int = MAX_HEADER) -> bytes:
    """Serialise one header with its length prefix.

    Raises:
        WireError: the header is not JSON-serialisable or larger than `limit`.
    """
    try:
        body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise WireError(f"header cannot be encoded as JSON: {e}") from e
    if len(body) > limit:
        raise WireError(f"header of {len(body)} bytes exceeds the {limit}-byte limit")
    return _PREFIX.pack(len(body)) + body


def send(
    sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview | None = None
) -> None:
    """Send a header, and `payload` after it (its length goes into the header as `"payload"`).

    Raises:
        WireError: the header cannot be encoded.
        OSError: the connection broke or a send timed out.
    """
    if payload is not None:
        header = {**header, "payload": len(payload)}
    sock.sendall(encode_header(header))
    if payload is not None and len(payload):
        sock.sendall(payload)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket.

    Raises:
        WireError: the peer closed the connection first.
        OSError: the connection broke or a receive timed out.
    """
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WireError(f"connection closed after {got} of {total} bytes")
        got += n


def recv_hashed_into(sock: socket.socket, view: memoryview) -> str:
    """Fill `view` from the socket, hashing each piece as it lands; return the xxh3_64 digest.

    The digest is the manifest's chunk checksum (`snapshot.copier.digest`). Hashing pieces small
    enough to still be in the CPU cache costs about half as much as hashing the chunk afterwards
    from memory, and on a host whose cores are busy copying network bytes that is what counts.

    Raises:
        WireError: the peer closed the connection first.
        OSError: the connection broke or a receive timed out.
    """
    hasher = chunk_hasher()
    recv_hashing_into(sock, view, hasher)
    return str(hasher.hexdigest())


def chunk_hasher() -> Any:
    """A fresh hasher of the manifest's chunk checksum (xxh3_64)."""
    return xxhash.xxh3_64()


def recv_hashing_into(sock: socket.socket, view: memoryview, hasher: Any) -> None:
    """Fill `view` from the socket, feeding each piece to `hasher` as it lands.

    Raises:
        WireError: the peer closed the connection first.
        OSError: the connection broke or a receive timed out.
    """
    for offset in range(0, len(view), HASH_PIECE):
        piece = view[offset : offset + HASH_PIECE]
        recv_exact_into(sock, piece)
        hasher.update(piece)


def recv_header(sock: socket.socket, limit: int = MAX_HEADER) -> dict[str, Any] | None:
    """Receive one header; None if the peer closed the connection before its first byte.

    Raises:
        WireError: the length is over `limit`, the body is not a JSON object, or the peer closed
            the connection mid-header.
        OSError: the connection broke or a receive timed out.
    """
    prefix = bytearray(_PREFIX.size)
    first = sock.recv_into(prefix)
    if first == 0:
        return None
    recv_exact_into(sock, memoryview(prefix)[first:])
    (length,) = _PREFIX.unpack(prefix)
    if length > limit:
        raise WireError(
            f"header length {length} exceeds the {limit}-byte limit (first bytes "
            f"{bytes(prefix)!r}: is the peer speaking {PROTOCOL}?)"
        )
    body = bytearray(length)
    recv_exact_into(sock, memoryview(body))
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def recv_bytes(sock: socket.socket, nbytes: int, limit: int) -> bytes:
    """Receive a payload of `nbytes` (at most `limit`) into a new buffer.

    Raises:
        WireError: `nbytes` is over `limit`, or the peer closed the connection first.
    """
    if not 0 <= nbytes <= limit:
        raise WireError(f"payload of {nbytes} bytes is outside 0..{limit}")
    buf = bytearray(nbytes)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def field(header: dict[str, Any], name: str, kind: type) -> Any:
    """`header[name]`, checked to be of `kind` (an int field never accepts a bool).

    Raises:
        WireError: the field is missing or has another type.
    """
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"header field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def payload_size(header: dict[str, Any]) -> int:
    """The payload length a header announces (0 when it announces none).

    Raises:
        WireError: the length is not a non-negative integer.
    """
    if "payload" not in header:
        return 0
    nbytes: int = field(header, "payload", int)
    if nbytes < 0:
        raise WireError(f"negative payload length {nbytes}")
    return nbytes


def error_header(message: str) -> dict[str, Any]:
    """The reply refusing a request, with the reason for the requester's logs."""
    return {"ok": False, "error": message}


def close_quietly(sock: socket.socket) -> None:
    """Close a connection whatever state it is in."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
