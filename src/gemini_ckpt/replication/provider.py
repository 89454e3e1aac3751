"""The serving end of retrieval: hand out checkpoints this machine holds, as replicas or its own.

    peer -> us   {"op": "manifest", rank, step}
    us -> peer   {"ok": true, "source"} + manifest JSON
    peer -> us   {"op": "fetch", rank, step, first_chunk, last_chunk}        (inclusive range)
    us -> peer   {"ok": true}, then {"op": "chunk", rank, step, index, digest} + bytes per chunk,
                 then {"ok": true} if the slot was not rewritten meanwhile,
                 else {"ok": false, "rewritten": true}
    peer -> us   {"op": "discard", rank, step}       (the fetcher found our copy corrupt)
    us -> peer   {"ok": true, "dropped"}
    peer -> us   {"op": "holdings"}
    us -> peer   {"ok": true, "replicas": {rank: [steps]}, "own": {rank: [steps]}}

Slots are read without holding them (`LocalStore.unchanged` afterwards instead of `reading()`), so a
fetch never delays a trainer's save or a peer's push; a slot rewritten mid-read ends the fetch with
an error instead of the final ok, and the fetcher's checksums would catch the torn bytes anyway.
Slot files are mapped once and the mappings reused by every later fetch.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from gemini_ckpt.errors import ReplicationError, StoreError
from gemini_ckpt.replication import wire
from gemini_ckpt.replication.mapping import SlotMappings
from gemini_ckpt.store.local_store import LocalStore, SlotRef

log = logging.getLogger(__name__)


class FetchRefused(ReplicationError):
    """A retrieval request this server cannot answer (not held, bad range)."""


class ReplicaProvider:
    """Serves the checkpoints in `replicas`, then those in `own` (if given)."""

    def __init__(self, replicas: LocalStore, own: LocalStore | None = None) -> None:
        self._stores = {"replica": replicas, **({"own": own} if own is not None else {})}
        self._mappings = SlotMappings(writable=False)

    def close(self) -> None:
        """Unmap the slots read so far (after the last fetch ended)."""
        self._mappings.close()

    def _find(self, rank: int, step: int) -> tuple[str, LocalStore, SlotRef]:
        for kind, store in self._stores.items():
            ref = store.locate(rank, step)
            if ref is not None:
                return kind, store, ref
        raise FetchRefused(f"rank {rank} step {step} is not held here")

    def handle(self, sock: socket.socket, where: str, header: dict[str, Any]) -> None:
        """Answer one retrieval request (op manifest, fetch, discard or holdings).

        Raises:
            WireError: the request is malformed beyond answering.
            OSError: the connection broke or timed out.
        """
        op = header.get("op")
        try:
            if op == "holdings":
                wire.send(sock, self._holdings())
                return
            rank = wire.field(header, "rank", int)
            step = wire.field(header, "step", int)
            if op == "manifest":
                kind, _, ref = self._find(rank, step)
                wire.send(sock, {"ok": True, "source": kind}, ref.manifest.to_json().encode())
            elif op == "fetch":
                self._fetch(sock, where, header, rank, step)
            elif op == "discard":
                self._discard(sock, where, rank, step)
            else:
                raise FetchRefused(f"unknown request {str(op)[:64]!r}")
        except FetchRefused as e:
            wire.send(sock, wire.error_header(str(e)))

    def _holdings(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": True, "own": {}}
        for kind, store in self._stores.items():
            held = store.inventory()
            reply["replicas" if kind == "replica" else kind] = {
                str(rank): steps for rank, steps in held.items() if steps
            }
        return reply

    def _discard(self, sock: socket.socket, where: str, rank: int, step: int) -> None:
        try:
            kind, store, _ = self._find(rank, step)
        except FetchRefused:
            wire.send(sock, {"ok": True, "dropped": False})
            return
        dropped = store.drop(rank, step)
        log.warning(
            "dropped the %s copy of rank %d step %d: %s found it corrupt", kind, rank, step, where
        )
        wire.send(sock, {"ok": True, "dropped": dropped})

    def _fetch(
        self, sock: socket.socket, where: str, header: dict[str, Any], rank: int, step: int
    ) -> None:
        kind, store, ref = self._find(rank, step)
        manifest = ref.manifest
        first = wire.field(header, "first_chunk", int)
        last = wire.field(header, "last_chunk", int)
        if not 0 <= first <= last < manifest.num_chunks:
            raise FetchRefused(
                f"asked for chunks {first}..{last} of rank {rank} step {step}, which has "
                f"{manifest.num_chunks} chunks"
            )
        try:
            view = self._mappings.view(ref.path, manifest.data_nbytes)
        except StoreError as e:
            raise FetchRefused(str(e)) from e
        wire.send(sock, {"ok": True, "source": kind})
        for index in range(first, last + 1):
            lo, hi = manifest.chunk_range(index)
            digest = manifest.chunk_digests[index]
            frame = {"op": "chunk", "rank": rank, "step": step, "index": index}
            wire.send(sock, {**frame, "digest": digest}, view[lo:hi])
        if store.unchanged(ref):
            wire.send(sock, {"ok": True})
            return
        log.info("rank %d step %d was rewritten while %s fetched it", rank, step, where)
        message = f"rank {rank} step {step} was rewritten while being sent"
        wire.send(sock, {**wire.error_header(message), "rewritten": True})
