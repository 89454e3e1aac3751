"""The receiver's side of chunks sent in pieces, driven frame by frame over real TCP.

A paced sender splits a chunk at an idle window's end; these tests speak the protocol by hand,
so that the receiver is checked on its own: pieces in order land and are hashed across frames,
and a piece that leaves a gap, overlaps, overruns its chunk or is empty cuts the connection
without touching the replica the peer already holds.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise

import pytest
from test_replication import SIZE, machines  # noqa: F401  (the fixture)

from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.replication import Timeouts, wire
from gemini_ckpt.replication.connection import connect, expect_ok
from helpers.replicas import commit, payload, read

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@contextmanager
def _push(machines, manifest: Manifest) -> Iterator[socket.socket]:  # noqa: F811
    """An authenticated connection on which the push of `manifest` has been granted."""
    sock = connect(machines.server.address, machines.credentials, Timeouts(io_s=10.0))
    try:
        head = {"op": "push", "rank": manifest.rank, "step": manifest.step, "generation": 0}
        wire.send(sock, head, manifest.to_json().encode())
        assert expect_ok(sock, "peer", "push") == {"ok": True}
        yield sock
    finally:
        sock.close()


def _piece(manifest: Manifest, index: int, offset: int, ack: bool = False) -> dict[str, object]:
    """The header of a piece of chunk `index` starting `offset` bytes into it."""
    frame: dict[str, object] = {
        "op": "chunk",
        "rank": manifest.rank,
        "step": manifest.step,
        "index": index,
        "digest": manifest.chunk_digests[index],
        "offset": offset,
    }
    if ack:
        frame["ack"] = True
    return frame


def _send_in_pieces(
    sock: socket.socket, manifest: Manifest, index: int, pieces: list[bytes], ack: bool = False
) -> None:
    """Send chunk `index` as `pieces`, back to back; the last asks for an acknowledgement."""
    offset = 0
    for n, piece in enumerate(pieces):
        wire.send(sock, _piece(manifest, index, offset, ack and n == len(pieces) - 1), piece)
        offset += len(piece)


def test_pieces_in_order_land_bit_identical_and_are_acknowledged(machines):  # noqa: F811
    data = payload(SIZE, 3)
    manifest = commit(machines.own, 0, 3, data).manifest
    with _push(machines, manifest) as sock:
        for index in range(manifest.num_chunks):
            start, end = manifest.chunk_range(index)
            # Three uneven pieces per chunk, the last asking for an acknowledgement.
            cuts = [start, start + 1000, start + (end - start) // 2 + 7, end]
            pieces = [data[left:right] for left, right in pairwise(cuts)]
            _send_in_pieces(sock, manifest, index, pieces, ack=True)
            assert wire.recv_header(sock) == {"ok": True, "ack": index}
        wire.send(sock, {"op": "commit"})
        assert expect_ok(sock, "peer", "commit")["ok"] is True
    assert read(machines.replicas, 0, 3) == data


def test_a_tampered_piece_fails_its_chunk_at_commit(machines):  # noqa: F811
    data = payload(SIZE, 4)
    manifest = commit(machines.own, 0, 4, data).manifest
    with _push(machines, manifest) as sock:
        for index in range(manifest.num_chunks):
            start, end = manifest.chunk_range(index)
            middle = start + (end - start) // 2
            second = bytearray(data[middle:end])
            if index == 1:
                second[0] ^= 0x01  # the first piece is intact: only hashing across both tells
            _send_in_pieces(sock, manifest, index, [data[start:middle], bytes(second)])
        wire.send(sock, {"op": "commit"})
        reply = wire.recv_header(sock)
    assert reply is not None and reply["ok"] is False
    assert "chunk(s) 1 failed verification" in reply["error"]
    assert machines.replicas.inventory() == {0: []}


@pytest.mark.parametrize(
    ("offset", "nbytes", "why"),
    [
        (2000, 500, "a gap"),
        (0, 500, "an overlap"),
        (1000, 64 << 10, "past the chunk's end"),
        (1000, 0, "empty"),
    ],
)
def test_a_piece_out_of_place_cuts_the_connection_and_the_old_replica_stays(
    machines,  # noqa: F811
    caplog,
    offset,
    nbytes,
    why,
):
    with machines.link() as link:
        assert link.push(machines.own, commit(machines.own, 0, 1, payload(SIZE, 1)), 0).ok
    data = payload(SIZE, 2)
    manifest = commit(machines.own, 0, 2, data).manifest
    caplog.set_level(logging.WARNING, logger="gemini_ckpt.replication.server")
    with _push(machines, manifest) as sock:
        wire.send(sock, _piece(manifest, 0, 0), data[:1000])
        wire.send(sock, _piece(manifest, 0, offset), data[offset : offset + nbytes])
        try:
            closed = wire.recv_header(sock) is None
        except ConnectionError:
            closed = True
    assert closed, f"a piece with {why} was accepted"
    assert any(
        "expected chunk 0 of rank 0 step 2 from byte 1000" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    # Nothing of step 2 became visible; step 1 is whole; the server still takes pushes.
    assert machines.replicas.inventory() == {0: [1]}
    assert read(machines.replicas, 0, 1) == payload(SIZE, 1)
    with machines.link() as link:
        assert link.push(machines.own, commit(machines.own, 0, 3, payload(SIZE, 3)), 0).ok
    assert read(machines.replicas, 0, 3) == payload(SIZE, 3)
