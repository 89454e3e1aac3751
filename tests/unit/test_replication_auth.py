"""Mutual authentication of replication peers, and loading the job secret.

Handshakes run over socket pairs; the refusals a server must survive run against a real
`ReplicaServer` on 127.0.0.1, which must go on serving honest peers afterwards.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.replication import (
    AuthenticationError,
    Credentials,
    ReplicaClient,
    ReplicaServer,
    ServerSettings,
    load_secret,
    new_secret,
    wire,
)
from gemini_ckpt.replication.auth import client_handshake, server_handshake
from gemini_ckpt.store.local_store import LocalStore

SECRET = b"s" * 32
JOB = "job-a"
SERVER_LOG = "gemini_ckpt.replication.server"


def _handshake(
    server: Credentials, client: Credentials
) -> tuple[Exception | None, Exception | None]:
    """Run both sides over a socket pair; each side's error (None when it succeeded)."""
    a, b = socket.socketpair()
    outcome: list[Exception | None] = [None]

    def serve() -> None:
        try:
            server_handshake(a, server, timeout_s=5)
        except AuthenticationError as e:
            outcome[0] = e

    thread = threading.Thread(target=serve)
    thread.start()
    client_error = None
    try:
        client_handshake(b, client, timeout_s=5)
    except AuthenticationError as e:
        client_error = e
    thread.join(5)
    a.close()
    b.close()
    return outcome[0], client_error


def test_both_sides_authenticate_with_the_same_job_and_secret():
    assert _handshake(Credentials(JOB, SECRET), Credentials(JOB, SECRET)) == (None, None)


def test_a_wrong_secret_is_refused_on_both_sides():
    server_error, client_error = _handshake(Credentials(JOB, SECRET), Credentials(JOB, b"t" * 32))
    assert "does not know the job secret (wrong secret)" in str(server_error)
    assert "refused: authentication failed" in str(client_error)


def test_another_job_with_the_same_secret_is_refused():
    server_error, client_error = _handshake(Credentials(JOB, SECRET), Credentials("job-b", SECRET))
    assert "peer is from job 'job-b', this agent serves job 'job-a'" in str(server_error)
    assert client_error is not None


def test_a_client_refuses_a_server_that_cannot_prove_the_secret():
    a, b = socket.socketpair()

    def impostor() -> None:
        wire.send(a, {"protocol": wire.PROTOCOL, "nonce": "00" * 32})
        wire.recv_header(a)
        wire.send(a, {"ok": True, "proof": "00" * 32})

    thread = threading.Thread(target=impostor)
    thread.start()
    with pytest.raises(AuthenticationError, match="the server does not know the job secret"):
        client_handshake(b, Credentials(JOB, SECRET), timeout_s=5)
    thread.join(5)
    a.close()
    b.close()


def test_credentials_never_show_the_secret_and_need_sixteen_bytes():
    assert SECRET.decode() not in repr(Credentials(JOB, SECRET))
    with pytest.raises(ConfigError, match="15 bytes; at least 16"):
        Credentials(JOB, b"x" * 15)
    with pytest.raises(ConfigError, match="job id"):
        Credentials("", SECRET)
    assert len(new_secret()) == 32 and new_secret() != new_secret()


@pytest.fixture
def server(tmp_path) -> Iterator[ReplicaServer]:
    store = LocalStore(tmp_path / "replicas", 16 << 20, kind="replica")
    store.start()
    settings = ServerSettings(handshake_timeout_s=0.5)
    with ReplicaServer(Credentials(JOB, SECRET), store, lambda: 0, settings=settings) as srv:
        yield srv
    store.close()


def _refused(server: ReplicaServer, caplog, send: bytes, reason: str, pause_s: float = 0.0) -> None:
    caplog.clear()
    with socket.create_connection(server.address, timeout=5) as sock:
        wire.recv_header(sock, wire.HANDSHAKE_MAX_HEADER)  # the server's challenge
        sock.sendall(send)
        time.sleep(pause_s)
        sock.settimeout(5)
        try:
            answer = wire.recv_header(sock, wire.HANDSHAKE_MAX_HEADER)
            assert answer in (None, {"ok": False, "error": "authentication failed"})
            assert sock.recv(1) == b""  # and then the server hangs up
        except ConnectionResetError:
            pass  # it hung up with our unread bytes in its buffer
    deadline = time.monotonic() + 5
    while not any(reason in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no log naming {reason!r}: {caplog.text}"
        time.sleep(0.01)
    message = next(r.getMessage() for r in caplog.records if reason in r.getMessage())
    assert message.startswith("refused a replication connection from 127.0.0.1:")
    # an honest peer is still served
    assert ReplicaClient(server.address, Credentials(JOB, SECRET)).holdings().replicas == {}


def test_the_server_refuses_garbage_oversized_and_slow_peers_and_keeps_serving(server, caplog):
    caplog.set_level("WARNING", SERVER_LOG)
    _refused(server, caplog, struct.pack(">I", 12) + b"not json at!", "malformed handshake")
    _refused(server, caplog, struct.pack(">I", 3) + b"[1]", "must be a JSON object")
    _refused(server, caplog, b"\xff\xff\xff\xffGET / HTTP/1.1\r\n", "exceeds the 4096-byte limit")
    _refused(server, caplog, b"\x00\x00", "handshake took longer than 0.5 s", pause_s=0.7)
    hello = wire.encode_header({"protocol": "other/9", "nonce": "00" * 32})
    _refused(server, caplog, hello, "peer speaks 'other/9'")


def test_the_server_logs_who_had_the_wrong_secret(server, caplog):
    caplog.set_level("WARNING", SERVER_LOG)
    with pytest.raises(AuthenticationError, match=r"peer 127\.0\.0\.1:\d+: refused"):
        ReplicaClient(server.address, Credentials(JOB, b"w" * 16)).holdings()
    time.sleep(0.1)
    assert "wrong secret" in caplog.text and "127.0.0.1:" in caplog.text


def test_a_secret_file_must_be_private_and_long_enough(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef0123\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644; other users could read it.*chmod 600"):
        load_secret(path, {})
    path.chmod(0o600)
    assert load_secret(path, {"GEMINI_JOB_SECRET": "ignored-when-a-file-is-given"}) == (
        b"0123456789abcdef0123"
    )
    path.write_bytes(b"short\n")
    with pytest.raises(ConfigError, match="holds 5 bytes; a job secret needs at least 16"):
        load_secret(path, {})
    with pytest.raises(ConfigError, match="cannot read job secret file"):
        load_secret(tmp_path / "missing", {})


def test_a_secret_from_the_environment_or_none_at_all():
    assert load_secret(None, {"GEMINI_JOB_SECRET": " a-long-enough-secret \n"}) == (
        b"a-long-enough-secret"
    )
    with pytest.raises(ConfigError, match="no job secret: give a secret file or set"):
        load_secret(None, {})
    with pytest.raises(ConfigError, match="GEMINI_JOB_SECRET holds 3 bytes"):
        load_secret(None, {"GEMINI_JOB_SECRET": "abc"})
