"""Peer replication over real TCP on 127.0.0.1, between real shared-memory slot files.

Each test has a source machine's own store, a peer's replica store behind a `ReplicaServer`, and a
third store that retrievals land in. Payloads are a few hundred KiB in 64 KiB chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gemini_ckpt.errors import CorruptCheckpointError, ReplicationError
from gemini_ckpt.replication import (
    AuthenticationError,
    Backoff,
    Credentials,
    PeerLink,
    PushStatus,
    ReplicaClient,
    ReplicaServer,
    SlotMappings,
    Timeouts,
    default_streams,
    fetch_replica,
    new_secret,
    push_replica,
)
from gemini_ckpt.store.budget import MemoryBudget
from gemini_ckpt.store.local_store import LocalStore
from helpers.replicas import JOB, commit, flip_byte, payload, read

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SIZE = 300_000  # 5 chunks of 64 KiB, the last one partial


@dataclass
class Machines:
    own: LocalStore
    replicas: LocalStore
    restored: LocalStore
    server: ReplicaServer
    credentials: Credentials
    generation: list[int]

    def link(self) -> PeerLink:
        return PeerLink(self.server.address, self.credentials)


def _store(path: Path, budget: int | MemoryBudget, kind: str = "own") -> LocalStore:
    store = LocalStore(path, budget, kind)
    store.start()
    return store


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    credentials = Credentials(JOB, new_secret())
    generation = [0]
    own = _store(tmp_path / "own", 64 << 20)
    replicas = _store(tmp_path / "replicas", 64 << 20, "replica")
    restored = _store(tmp_path / "restored", 64 << 20)
    server = ReplicaServer(credentials, replicas, lambda: generation[0], own=own)
    server.start()
    try:
        yield Machines(own, replicas, restored, server, credentials, generation)
    finally:
        server.close()
        for store in (own, replicas, restored):
            store.close()


def test_a_push_lands_bit_identical_in_the_replica_store(machines):
    data = payload(SIZE, 1)
    ref = commit(machines.own, 0, 1, data)
    with machines.link() as link:
        result = link.push(machines.own, ref, generation=0)
    assert result.status is PushStatus.REPLICATED, result.describe()
    assert result.nbytes == SIZE
    assert machines.replicas.inventory() == {0: [1]}
    assert read(machines.replicas, 0, 1) == data
    held = machines.replicas.locate(0, 1)
    assert held is not None and held.manifest == ref.manifest


def test_the_replica_keeps_the_two_newest_steps_and_the_link_is_reused(machines):
    with machines.link() as link:
        for step in (1, 2, 3):
            ref = commit(machines.own, 0, step, payload(SIZE, step))
            assert link.push(machines.own, ref, 0).ok
        first = link._sock
        assert first is not None
        assert link.push(machines.own, commit(machines.own, 0, 4, payload(SIZE, 4)), 0).ok
        assert link._sock is first  # one connection across pushes
    assert machines.replicas.inventory() == {0: [3, 4]}
    assert read(machines.replicas, 0, 4) == payload(SIZE, 4)
    assert read(machines.replicas, 0, 3) == payload(SIZE, 3)


def test_pushing_a_checkpoint_the_peer_holds_again_sends_nothing(machines):
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert link.push(machines.own, ref, 0).ok
        again = link.push(machines.own, ref, 0)  # a retry, or after a recovery reset
    assert (again.status, again.nbytes, again.reason) == (
        PushStatus.REPLICATED,
        0,
        "the peer already held it",
    )
    assert machines.replicas.inventory() == {0: [1]}


def test_a_chunk_corrupted_in_flight_is_rejected_and_the_previous_replica_stays(machines, caplog):
    with machines.link() as link:
        assert link.push(machines.own, commit(machines.own, 0, 1, payload(SIZE, 1)), 0).ok
        bad = link.push(machines.own, commit(machines.own, 0, 2, payload(SIZE, 2)), 0, 3)
        assert bad.status is PushStatus.REFUSED
        assert "rank 0 step 2" in bad.reason and "chunk(s) 3 failed verification" in bad.reason
        assert machines.replicas.inventory() == {0: [1]}
        assert machines.replicas.writing_step(0) is None
        assert read(machines.replicas, 0, 1) == payload(SIZE, 1)
        # the connection stays usable: the next step replicates
        assert link.push(machines.own, commit(machines.own, 0, 3, payload(SIZE, 3)), 0).ok
    assert machines.replicas.inventory() == {0: [1, 3]}
    assert any(
        r.levelno == logging.WARNING and "chunk(s) 3 failed verification" in r.getMessage()
        for r in caplog.records
    )


def test_a_source_slot_overwritten_mid_push_aborts_and_no_torn_replica_appears(
    machines, monkeypatch
):
    own = machines.own
    with machines.link() as link:
        assert link.push(own, commit(own, 0, 1, payload(SIZE, 1)), 0).ok
    commit(own, 0, 2, payload(SIZE, 2))
    commit(own, 0, 3, payload(SIZE, 3))
    ref = own.locate(0, 2)
    calls = []
    real_unchanged = own.unchanged

    def trainer_saves_step_4_after_chunk_1(r):
        calls.append(r)
        if len(calls) == 3:  # the check before sending, after chunk 0, after chunk 1
            path = own.begin_write(0, own.prepare_write(0, 4))  # step 2's slot: the oldest
            assert path == ref.path
            flip_byte(ref, SIZE - 1)  # the trainer's new bytes
        return real_unchanged(r)

    monkeypatch.setattr(own, "unchanged", trainer_saves_step_4_after_chunk_1)
    with machines.link() as link:
        result = link.push(own, ref, 0)
        assert result.status is PushStatus.SKIPPED and result.skipped
        assert result.reason == "the source slot was overwritten after chunk 1"
        assert result.nbytes == 2 * (64 << 10)
        assert machines.replicas.inventory() == {0: [1]}
        assert machines.replicas.locate(0, 2) is None
        assert machines.replicas.writing_step(0) is None
        assert read(machines.replicas, 0, 1) == payload(SIZE, 1)
        # a slot already rewritten is skipped before a byte is sent
        again = link.push(own, ref, 0)
        assert (again.status, again.nbytes) == (PushStatus.SKIPPED, 0)


def test_pushes_of_another_generation_are_refused(machines, monkeypatch):
    machines.generation[0] = 3
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        stale = link.push(machines.own, ref, generation=2)
        assert stale.status is PushStatus.REFUSED
        assert "from generation 2; the job is in generation 3" in stale.reason
        assert stale.nbytes == 0
        # a recovery that starts while the bytes travel: refused at the commit
        real_unchanged = machines.own.unchanged
        checks = []

        def recovery_begins_after_chunk_0(r):
            checks.append(r)
            if len(checks) == 2:
                machines.generation[0] = 4
            return real_unchanged(r)

        monkeypatch.setattr(machines.own, "unchanged", recovery_begins_after_chunk_0)
        moved = link.push(machines.own, ref, generation=3)
    assert moved.status is PushStatus.REFUSED
    assert "moved to generation 4" in moved.reason
    assert machines.replicas.inventory() == {0: []}


def test_steps_must_increase_and_a_refusal_keeps_the_server_serving(machines):
    with machines.link() as link:
        assert link.push(machines.own, commit(machines.own, 0, 5, payload(SIZE, 5)), 0).ok
        other = LocalStore(machines.own.directory.parent / "other", 64 << 20)
        other.start()
        try:
            older = link.push(other, commit(other, 0, 4, payload(SIZE, 4)), 0)
        finally:
            other.close()
        assert older.status is PushStatus.REFUSED
        assert "steps must increase and step 5 is already committed" in older.reason
        assert link.push(machines.own, commit(machines.own, 0, 6, payload(SIZE, 6)), 0).ok
    assert machines.replicas.inventory() == {0: [5, 6]}


def test_fetch_over_four_streams_restores_identical_bytes_and_commits(machines):
    data = payload(SIZE, 9)
    with machines.link() as link:
        assert push_replica(link, machines.own, commit(machines.own, 2, 7, data), 0).ok
    endpoint = "{}:{}".format(*machines.server.address)  # as membership records carry it
    result = fetch_replica(endpoint, machines.credentials, 2, 7, machines.restored, streams=4)
    assert (result.rank, result.step, result.nbytes, result.streams) == (2, 7, SIZE, 4)
    assert result.source.endswith("(replica)")
    assert machines.restored.inventory() == {2: [7]}
    assert read(machines.restored, 2, 7) == data
    assert result.ref.manifest == machines.replicas.locate(2, 7).manifest
    again = fetch_replica(endpoint, machines.credentials, 2, 7, machines.restored)
    assert again.streams == min(default_streams(), 5)  # one part per chunk at most
    assert read(machines.restored, 2, 7) == data


def test_a_client_that_keeps_the_destination_mapped_maps_it_once(machines):
    mappings = SlotMappings(writable=True)
    client = ReplicaClient(machines.server.address, machines.credentials, mappings=mappings)
    try:
        with machines.link() as link:
            for step in (1, 2):
                data = payload(SIZE, step)
                assert push_replica(link, machines.own, commit(machines.own, 0, step, data), 0).ok
                result = client.fetch(0, step, machines.restored, streams=3)
                assert read(machines.restored, 0, step) == data
                assert machines.restored.inventory() == {0: [step]}
        assert list(mappings._maps) == [result.ref.path]  # slot 0, mapped by the first fetch
    finally:
        mappings.close()


def test_a_surviving_machine_serves_its_own_ranks_too(machines):
    data = payload(SIZE, 4)
    commit(machines.own, 1, 3, data)  # never pushed: only in the server machine's own store
    client = ReplicaClient(machines.server.address, machines.credentials)
    held = client.holdings()
    assert (held.replicas, held.own) == ({}, {1: [3]})
    result = client.fetch(1, 3, machines.restored, streams=2)
    assert result.source.endswith("(own)") and result.streams == 2
    assert read(machines.restored, 1, 3) == data
    with pytest.raises(ReplicationError, match=r"refused manifest: rank 1 step 2 is not held"):
        client.fetch(1, 2, machines.restored)


def test_a_corrupt_replica_fails_the_fetch_and_is_discarded_at_the_peer(machines, caplog):
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert push_replica(link, machines.own, ref, 0).ok
    held = machines.replicas.locate(0, 1)
    flip_byte(held, 2 * (64 << 10) + 5)  # chunk 2 rots in the peer's memory
    with pytest.raises(
        CorruptCheckpointError,
        match=r"rank 0 step 1 from 127\.0\.0\.1:\d+: chunk\(s\) 2 of 5 failed verification; "
        r"the peer discarded its copy",
    ):
        fetch_replica(machines.server.address, machines.credentials, 0, 1, machines.restored)
    assert machines.replicas.locate(0, 1) is None
    assert machines.restored.locate(0, 1) is None
    assert machines.restored.writing_step(0) is None
    assert "found it corrupt" in caplog.text


def test_a_replica_rewritten_while_being_fetched_is_not_taken_for_corrupt(machines, monkeypatch):
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert push_replica(link, machines.own, ref, 0).ok
    flip_byte(machines.replicas.locate(0, 1), 5)  # torn by the rewrite...
    monkeypatch.setattr(machines.replicas, "unchanged", lambda ref: False)  # ...which it sees
    with pytest.raises(ReplicationError, match="no longer holds that step") as raised:
        fetch_replica(machines.server.address, machines.credentials, 0, 1, machines.restored)
    assert not isinstance(raised.value, CorruptCheckpointError)
    assert machines.replicas.inventory() == {0: [1]}  # no DISCARD was sent
    assert machines.restored.locate(0, 1) is None


def test_a_wrong_secret_can_neither_push_nor_fetch(machines, caplog):
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert push_replica(link, machines.own, ref, 0).ok
    intruder = Credentials(JOB, new_secret())
    with PeerLink(machines.server.address, intruder) as link:
        result = link.push(machines.own, commit(machines.own, 0, 2, payload(SIZE, 2)), 0)
    assert result.status is PushStatus.REFUSED and "authentication failed" in result.reason
    assert not result.ok and not result.skipped
    with pytest.raises(AuthenticationError, match="refused: authentication failed"):
        fetch_replica(machines.server.address, intruder, 0, 1, machines.restored)
    assert machines.replicas.inventory() == {0: [1]}
    assert machines.restored.inventory() == {}
    assert "wrong secret" in caplog.text


def test_a_replica_over_the_memory_budget_is_refused_clearly_and_logged_once(tmp_path, caplog):
    credentials = Credentials(JOB, new_secret())
    budget = MemoryBudget(3 << 20)
    own = _store(tmp_path / "own", budget)
    replicas = _store(tmp_path / "replicas", budget, "replica")
    source = _store(tmp_path / "source", 64 << 20)
    own.allocate(0, 1 << 20)  # this machine's own rank holds 2 of its 3 MiB
    try:
        with (
            ReplicaServer(credentials, replicas, lambda: 0) as server,
            PeerLink(server.address, credentials) as link,
        ):
            results = [
                link.push(source, commit(source, 5, step, payload(SIZE, step)), 0)
                for step in (1, 2)
            ]
    finally:
        for store in (own, replicas, source):
            store.close()
    for result in results:
        assert result.status is PushStatus.REFUSED
        assert "the replica of rank 5 needs 2 slots of 1.00 MiB" in result.reason
        assert "budget is 3.00 MiB" in result.reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot hold the replica of rank 5" in errors[0].getMessage()


def test_an_unreachable_peer_is_a_result_and_the_link_backs_off(machines):
    address = machines.server.address
    machines.server.close()
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    link = PeerLink(address, machines.credentials, Timeouts(connect_s=1.0), Backoff(5.0, 5.0))
    with link:
        first = link.push(machines.own, ref, 0)
        second = link.push(machines.own, ref, 0)
    assert first.status is second.status is PushStatus.UNREACHABLE
    assert f"peer {address[0]}:{address[1]} is unreachable" in first.reason
    assert "next try in" in second.reason and second.seconds < 0.5


def test_a_partitioned_server_drops_connections_until_the_time_is_up(machines):
    ref = commit(machines.own, 0, 1, payload(SIZE, 1))
    with machines.link() as link:
        assert link.push(machines.own, ref, 0).ok
        # Long enough that the push below falls inside it on a busy host too.
        machines.server.refuse_for(2.0)
        cut = link.push(machines.own, commit(machines.own, 0, 2, payload(SIZE, 2)), 0)
        assert cut.status is PushStatus.UNREACHABLE
        time.sleep(2.2)
        after = link.push(machines.own, commit(machines.own, 0, 3, payload(SIZE, 3)), 0)
    assert after.ok, after.describe()
    assert machines.replicas.inventory() == {0: [1, 3]}
