"""EtcdKV, election and the private server against a real etcd on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination import etcd_server
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.control_kv import Compare, Get, Put
from gemini_ckpt.coordination.election import Election, fenced_txn
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.coordination.etcd_server import EtcdServer, EtcdServerConfig
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.lease import LeaseKeeper
from gemini_ckpt.coordination.watch import EventQueue
from gemini_ckpt.errors import EtcdServerError, NotLeaderError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd missing (package etcd-server)"),
]


@pytest.fixture(scope="module")
def server():
    with EtcdServer() as s:
        yield s


@pytest.fixture
def kv(server):
    client = EtcdKV(EtcdClientConfig(server.endpoints)).start()
    client.delete_prefix("")
    yield client
    client.close()


def _wait_for(events: EventQueue, kind: str, key: str, timeout_s: float) -> float:
    """Seconds until an event `kind` on `key` arrives (fails the test after `timeout_s`)."""
    started = time.monotonic()
    deadline = started + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        event = events.get(remaining)
        if event is not None and (event.kind, event.key) == (kind, key):
            return time.monotonic() - started
    pytest.fail(f"no {kind} of {key} within {timeout_s} s")


def test_lease_expires_within_ttl_plus_a_small_margin(kv):
    events = EventQueue()
    with kv.watch_prefix("member/", events.put, start_revision=0):
        lease = kv.grant_lease(1)
        kv.put("member/m0", b"up", lease=lease.id)
        elapsed = _wait_for(events, "delete", "member/m0", timeout_s=3)
    # etcd checks for expired leases every 500 ms.
    assert 0.9 <= elapsed <= 1.0 + 0.75


def test_keeper_holds_a_lease_until_its_holder_stops(kv):
    lease = kv.grant_lease(1)
    kv.put("member/m1", b"up", lease=lease.id)
    keeper = LeaseKeeper(kv, lease).start()
    time.sleep(1.5)  # past the TTL: only the refreshes keep the key
    assert kv.get("member/m1") == b"up"
    assert keeper.lost is None
    keeper.close(revoke=False)  # the agent hangs: no more refreshes, no revoke
    events = EventQueue()
    with kv.watch_prefix("member/", events.put, start_revision=0):
        assert _wait_for(events, "delete", "member/m1", timeout_s=3) <= 1.0 + 0.75


def test_watch_delivers_every_event_in_order(kv):
    events = EventQueue()
    start = kv.get_prefix("o/").revision + 1

    def writer(w: int) -> None:
        for i in range(25):
            kv.put(f"o/w{w}", str(i).encode())
        kv.delete(f"o/w{w}")

    with kv.watch_prefix("o/", events.put, start_revision=start):
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        got = [events.get(5) for _ in range(4 * 26)]
    assert all(e is not None for e in got)
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    for w in range(4):
        mine = [e for e in got if e.key == f"o/w{w}"]
        assert [e.value for e in mine[:-1]] == [str(i).encode() for i in range(25)]
        assert mine[-1].kind == "delete"
    assert events.get(0.1) is None


def test_transactions_are_atomic_under_contention(kv):
    kv.txn([], [Put("bank/a", b"100"), Put("bank/b", b"0")])
    seen_totals: set[int] = set()
    stop = threading.Event()

    def transfer() -> None:
        for _ in range(20):
            while True:
                a, b = kv.get_kv("bank/a"), kv.get_kv("bank/b")
                moved = kv.txn(
                    [
                        Compare.mod_revision("bank/a", "==", a.mod_revision),
                        Compare.mod_revision("bank/b", "==", b.mod_revision),
                    ],
                    [
                        Put("bank/a", str(int(a.value) - 1).encode()),
                        Put("bank/b", str(int(b.value) + 1).encode()),
                    ],
                )
                if moved.succeeded:
                    break

    def audit() -> None:
        while not stop.is_set():
            items = kv.get_prefix("bank/").items
            seen_totals.add(sum(int(item.value) for item in items))

    auditor = threading.Thread(target=audit)
    auditor.start()
    workers = [threading.Thread(target=transfer) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    stop.set()
    auditor.join(5)
    assert kv.get("bank/a") == b"20" and kv.get("bank/b") == b"80"
    assert seen_totals == {100}  # no read ever saw half a transfer


def test_a_stale_leader_cannot_write(kv):
    old_lease, new_lease = kv.grant_lease(1), kv.grant_lease(5)
    stale = Election(kv, "root/leader", "m0")
    fresh = Election(kv, "root/leader", "m1", poll_s=0.1)
    old = stale.campaign(old_lease.id, timeout_s=2)
    fenced_txn(kv, old, [Put("plan/1", b"by m0")])
    # m0's process stops refreshing (say, stuck in a long GC) but lives on.
    with LeaseKeeper(kv, new_lease):
        started = time.monotonic()
        new = fresh.campaign(new_lease.id, timeout_s=5)
        assert new is not None
        assert time.monotonic() - started <= 1.0 + 0.75
        with pytest.raises(NotLeaderError, match="m1 does since revision"):
            fenced_txn(kv, old, [Put("plan/1", b"stale plan by m0")])
        result = fenced_txn(kv, new, [Put("plan/1", b"by m1"), Get("plan/1")])
        assert result.reads[0].value == b"by m1"
        assert fresh.leader().candidate == "m1"


def test_a_stale_root_cannot_publish_a_plan_or_open_a_generation(kv):
    plane = ControlPlane(kv, "job", machines=2)
    coordinator = JobCoordinator(kv, "job", machines=2)
    old_lease, new_lease = kv.grant_lease(1), kv.grant_lease(5)
    plane.join(0, old_lease.id, {})
    old = Election(kv, plane.leader_key, "m0").campaign(old_lease.id, timeout_s=2)
    assert old is not None
    # Machine 0's agent stalls past its TTL but its process lives on; machine 1 becomes root.
    with LeaseKeeper(kv, new_lease):
        new = Election(kv, plane.leader_key, "m1", poll_s=0.1).campaign(new_lease.id, timeout_s=5)
        assert new is not None
        with pytest.raises(NotLeaderError):
            plane.publish_plan(old, 0, {"step": 7, "generation": 0}, {"addr": "x", "port": 1})
        with pytest.raises(NotLeaderError):
            plane.advance_generation(old, 0, {"kind": "software failure"}, replace=(1,))
        assert not coordinator.has_plan(0)
        assert coordinator.generation() == 0
        assert plane.replacement_requests() == {}
        assert plane.publish_plan(new, 0, {"step": 3, "generation": 0}, {"addr": "x", "port": 2})
        assert coordinator.has_plan(0)


def test_children_started_while_streams_run_do_not_disturb_them(kv):
    """fork+exec (how agents start trainers) while a watch and a keep-alive are active."""
    events = EventQueue()
    lease = kv.grant_lease(1)
    with kv.watch_prefix("fork/", events.put, start_revision=0), LeaseKeeper(kv, lease) as keeper:
        for i in range(30):
            subprocess.run(["true"], check=True)
            kv.put(f"fork/{i}", b"1", lease=lease.id)
        got = [events.get(5) for _ in range(30)]
        assert [e.key for e in got if e is not None] == [f"fork/{i}" for i in range(30)]
        assert keeper.lost is None


def test_a_brief_outage_is_ridden_out_by_retrying_calls(tmp_path):
    with EtcdServer(EtcdServerConfig(data_dir=tmp_path)) as server:
        client = EtcdKV(EtcdClientConfig(server.endpoints, request_timeout_s=10)).start()
        events = EventQueue()
        client.put("x/before", b"1")
        with client.watch_prefix("x/", events.put, start_revision=0):
            server.kill(0)
            results: list[int] = []
            putter = threading.Thread(target=lambda: results.append(client.put("x/during", b"2")))
            putter.start()
            time.sleep(0.5)
            server.restart(0)
            putter.join(15)
            client.put("x/after", b"3")
            got = [events.get(5) for _ in range(2)]
        assert results, "the put during the outage did not complete"
        assert [e.key for e in got if e is not None] == ["x/during", "x/after"]
        assert client.get("x/before") == b"1"
        client.close()


def test_a_dead_member_costs_a_round_trip_not_the_calls_budget(server, kv):
    # The first endpoint refuses connections (a killed member). A call whose whole budget is
    # one attempt must still reach the live one: waiting for the dead one to come back would
    # spend it all there (and make every call in turn land on it and fail).
    (dead,) = etcd_server.free_ports("127.0.0.1", 1)
    config = EtcdClientConfig(
        (f"127.0.0.1:{dead}", *server.endpoints), request_timeout_s=1.0, attempt_timeout_s=1.0
    )
    kv.put("x", b"1")
    with EtcdKV(config).start(check=False) as client:
        for _ in range(3):
            started = time.monotonic()
            assert client.get("x", timeout_s=1.0) == b"1"
            assert time.monotonic() - started < 0.5
            client._pool.failed(client._pool.pick())  # back round to the dead member


def test_a_missing_binary_says_what_to_install():
    with pytest.raises(EtcdServerError, match="etcd-server"):
        EtcdServer(EtcdServerConfig(binary="etcd-not-installed-here")).start()


def test_a_port_taken_after_it_was_chosen_is_retried(monkeypatch):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = etcd_server.free_ports
    calls: list[int] = []

    def racy(host: str, count: int) -> list[int]:
        calls.append(count)
        ports = real(host, count)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(etcd_server, "free_ports", racy)
    try:
        with EtcdServer() as server:
            assert len(calls) == 2
            assert not server.endpoint.endswith(f":{taken}")
            with EtcdKV(EtcdClientConfig(server.endpoints)).start() as client:
                client.put("k", b"v")
    finally:
        squatter.close()


def test_cli_serves_until_interrupted():
    env = {**os.environ, "GEMINI_ETCD_CLIENT_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemini_ckpt", "etcd", "--peer-port", "0", "--election-ms", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("127.0.0.1:")
        with EtcdKV(EtcdClientConfig((endpoint,))).start() as client:
            client.put("cli", b"ok")
            assert client.get("cli") == b"ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopping etcd" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
