"""Length-prefixed JSON frames over a stream socket: a 4-byte big-endian length, then UTF-8 JSON.

Frames are bounded; a peer that sends anything else gets a `ProtocolError` saying what was wrong.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from gemini_ckpt.errors import ProtocolError

MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">I")


class FramingBroken(ProtocolError):
    """The byte stream can no longer be split into frames; the connection must be closed."""


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message as a frame.

    Raises:
        ProtocolError: the message is not JSON-serialisable or exceeds `MAX_FRAME`.
    """
    try:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"message cannot be encoded as JSON: {e}") from e
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one message (see `encode_frame`)."""
    sock.sendall(encode_frame(message))


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes | None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise FramingBroken(f"connection closed after {got} of {nbytes} bytes of a frame")
        got += n
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Receive one message; None when the peer closed the connection between frames.

    Raises:
        FramingBroken: the length prefix is impossible or the peer closed mid-frame.
        ProtocolError: the frame is not a JSON object (the stream is still usable).
    """
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FramingBroken(
            f"frame length {length} exceeds the {MAX_FRAME}-byte limit "
            f"(first bytes {header!r}: is the peer speaking the Gemini protocol?)"
        )
    body = _recv_exact(sock, length)
    if body is None:
        raise FramingBroken(f"connection closed before a {length}-byte frame body")
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {e}") from e
    if not isinstance(message, dict):
        raise ProtocolError(f"frame must hold a JSON object, got {type(message).__name__}")
    return message
