"""Mutual authentication of agents with the job's secret, on every new connection.

Before anything else crosses a replication connection, each side proves it knows the per-job
secret without sending it:

    server -> client   {"protocol", "nonce": Ns}
    client -> server   {"protocol", "job", "nonce": Nc,
                        "proof": HMAC(secret, "client" | ctx | Ns | Nc)}
    server -> client   {"ok": true, "proof": HMAC(secret, "server" | ctx | Ns | Nc)}

`ctx` holds the protocol version and the job id, so a secret reused by another job (or another
version of this protocol) does not authenticate, and fresh nonces on both sides make a recorded
exchange useless. Both proofs are compared in constant time. The whole exchange has a deadline, so
a peer that sends nothing (or one byte a minute) cannot hold a server thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemini_ckpt.errors import ConfigError, ReplicationError
from gemini_ckpt.replication import wire

SECRET_ENV = "GEMINI_JOB_SECRET"
"""Where `load_secret` finds the secret when no file is given."""
MIN_SECRET_BYTES = 16
_NONCE_BYTES = 32


class AuthenticationError(ReplicationError):
    """A peer did not prove it knows this job's secret (or spoke something else entirely)."""


class HandshakeBroken(ReplicationError):
    """The connection closed or went silent during the handshake: a network failure, not a no."""


@dataclass(frozen=True)
class Credentials:
    """What a connection proves: this job's id and its secret (never shown in a repr).

    Raises:
        ConfigError: the job id is empty or the secret shorter than 16 bytes.
    """

    job: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.job:
            raise ConfigError("the job id used for replication is empty")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the job secret has {len(self.secret)} bytes; at least {MIN_SECRET_BYTES} "
                "are needed"
            )

    def proof(self, role: str, server_nonce: bytes, client_nonce: bytes) -> str:
        """HMAC-SHA256 over the role, protocol, job and both nonces, in hex."""
        message = b"\0".join(
            (role.encode(), wire.PROTOCOL.encode(), self.job.encode(), server_nonce, client_nonce)
        )
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def new_secret() -> bytes:
    """A fresh random job secret (32 bytes)."""
    return secrets.token_bytes(32)


def load_secret(path: Path | None, env: Mapping[str, str]) -> bytes:
    """The job secret from `path` if given, else from `env[GEMINI_JOB_SECRET]`.

    Surrounding whitespace is stripped (a file written by `echo` ends with a newline).

    Raises:
        ConfigError: the file is missing, readable by its group or others, or the secret (from
            either source) is missing or shorter than 16 bytes.
    """
    if path is not None:
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"job secret file {path} has mode {stat.S_IMODE(mode):04o}; other users "
                    f"could read it: make it private (chmod 600 {path})"
                )
            secret = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"cannot read job secret file {path}: {e.strerror}") from e
        source = f"job secret file {path}"
    elif env.get(SECRET_ENV):
        secret = env[SECRET_ENV].strip().encode("utf-8")
        source = SECRET_ENV
    else:
        raise ConfigError(f"no job secret: give a secret file or set {SECRET_ENV}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{source} holds {len(secret)} bytes; a job secret needs at least {MIN_SECRET_BYTES}"
        )
    return secret


class _Deadline:
    """Applies what is left of one overall deadline to each socket operation."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def arm(self) -> None:
        left = self._end - time.monotonic()
        if left <= 0:
            raise HandshakeBroken(f"handshake took longer than {self._timeout_s:g} s")
        self._sock.settimeout(left)

    def recv(self) -> dict[str, Any]:
        self.arm()
        try:
            header = wire.recv_header(self._sock, wire.HANDSHAKE_MAX_HEADER)
        except TimeoutError as e:
            raise HandshakeBroken(
                f"handshake took longer than {self._timeout_s:g} s (peer too slow or silent)"
            ) from e
        except wire.WireError as e:
            raise AuthenticationError(f"malformed handshake: {e}") from e
        if header is None:
            raise HandshakeBroken("peer closed the connection during the handshake")
        return header

    def send(self, header: dict[str, Any]) -> None:
        self.arm()
        try:
            self._sock.sendall(wire.encode_header(header, wire.HANDSHAKE_MAX_HEADER))
        except TimeoutError as e:
            raise HandshakeBroken(
                f"handshake took longer than {self._timeout_s:g} s (peer not reading)"
            ) from e


def _nonce(header: dict[str, Any]) -> bytes:
    try:
        nonce = bytes.fromhex(wire.field(header, "nonce", str))
    except (wire.WireError, ValueError) as e:
        raise AuthenticationError(f"malformed handshake nonce: {e}") from e
    if len(nonce) != _NONCE_BYTES:
        raise AuthenticationError(f"handshake nonce of {len(nonce)} bytes, not {_NONCE_BYTES}")
    return nonce


def _check_protocol(header: dict[str, Any]) -> None:
    if header.get("protocol") != wire.PROTOCOL:
        raise AuthenticationError(
            f"peer speaks {str(header.get('protocol'))[:64]!r}, not {wire.PROTOCOL!r}"
        )


def server_handshake(sock: socket.socket, credentials: Credentials, timeout_s: float) -> None:
    """Authenticate the client on a freshly accepted connection, and prove ourselves to it.

    On success the socket is left blocking (no timeout); the caller sets its own.

    Raises:
        AuthenticationError: the client failed (wrong secret, other job or protocol, malformed or
            oversized message); the reason is for the server's log only, the client is just told
            that authentication failed.
        HandshakeBroken: the client closed the connection or was too slow.
        OSError: the connection broke.
    """
    deadline = _Deadline(sock, timeout_s)
    server_nonce = secrets.token_bytes(_NONCE_BYTES)
    deadline.send({"protocol": wire.PROTOCOL, "nonce": server_nonce.hex()})
    try:
        hello = deadline.recv()
        _check_protocol(hello)
        client_nonce = _nonce(hello)
        job = hello.get("job")
        if job != credentials.job:
            raise AuthenticationError(
                f"peer is from job {str(job)[:128]!r}, this agent serves job {credentials.job!r}"
            )
        expected = credentials.proof("client", server_nonce, client_nonce)
        if not hmac.compare_digest(str(hello.get("proof", "")), expected):
            raise AuthenticationError("peer does not know the job secret (wrong secret)")
    except AuthenticationError:
        # Tell the client no more than that it failed: an unauthenticated peer learns nothing.
        with contextlib.suppress(OSError, AuthenticationError):
            deadline.send(wire.error_header("authentication failed"))
        raise
    deadline.send({"ok": True, "proof": credentials.proof("server", server_nonce, client_nonce)})
    sock.settimeout(None)


def client_handshake(sock: socket.socket, credentials: Credentials, timeout_s: float) -> None:
    """Prove to a server that we know the job secret, and check that it knows it too.

    On success the socket is left blocking (no timeout); the caller sets its own.

    Raises:
        AuthenticationError: the server refused us, or failed to prove it knows the secret.
        HandshakeBroken: the server closed the connection or did not answer within `timeout_s`.
        OSError: the connection broke.
    """
    deadline = _Deadline(sock, timeout_s)
    hello = deadline.recv()
    _check_protocol(hello)
    server_nonce = _nonce(hello)
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    deadline.send(
        {
            "protocol": wire.PROTOCOL,
            "job": credentials.job,
            "nonce": client_nonce.hex(),
            "proof": credentials.proof("client", server_nonce, client_nonce),
        }
    )
    answer = deadline.recv()
    if answer.get("ok") is not True:
        raise AuthenticationError(
            f"refused: {str(answer.get('error'))[:200]} (is the job secret or job id different?)"
        )
    expected = credentials.proof("server", server_nonce, client_nonce)
    if not hmac.compare_digest(str(answer.get("proof", "")), expected):
        raise AuthenticationError("the server does not know the job secret (wrong secret)")
    sock.settimeout(None)
