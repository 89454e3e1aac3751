"""The shaped test bed: machines in their own network namespaces, links capped with tc.

Needs root and iproute2 (and etcd for the end-to-end run); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gemini_ckpt.demo import final_state, train_gpt
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.recovery.plan import LOCAL_MEMORY, peer_source
from gemini_ckpt.testbed import netns
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("tc") is None,
        reason="iproute2 (ip, tc) is not installed",
    ),
]

CAP_MBIT = 200
PAYLOAD = 8 << 20

# Receives one connection on a free port (printed first) and prints the rate it arrived at,
# timed from the first byte so connection set-up does not count.
RECEIVER = textwrap.dedent(
    """
    import socket, sys, time
    server = socket.create_server((sys.argv[1], 0))
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    first = conn.recv(1 << 16)
    started, total = time.monotonic(), 0
    while chunk := conn.recv(1 << 20):
        total += len(chunk)
    print(total * 8 / (time.monotonic() - started) / 1e6, len(first) + total, flush=True)
    """
)
SENDER = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2]))).sendall(bytes(int(sys.argv[3])))"  # noqa: E501


def measure_mbit(net: netns.ShapedNetwork, sender: int, receiver: int) -> float:
    """Send PAYLOAD bytes from machine `sender` to machine `receiver`; the rate in Mbit/s."""
    addr = net.address(receiver)
    with subprocess.Popen(
        [*net.exec_prefix(receiver), sys.executable, "-c", RECEIVER, addr],
        stdout=subprocess.PIPE,
        text=True,
    ) as rx:
        assert rx.stdout is not None
        port = rx.stdout.readline().strip()
        subprocess.run(
            [*net.exec_prefix(sender), sys.executable, "-c", SENDER, addr, port, str(PAYLOAD)],
            check=True,
            timeout=30,
        )
        rate, received = rx.stdout.readline().split()
        assert rx.wait(10) == 0
    assert int(received) == PAYLOAD
    return float(rate)


def namespaces_of(subnet: int) -> list[str]:
    return [n for n in netns.our_namespaces() if n.startswith(f"{netns.PREFIX}{subnet}-")]


def uplink_exists(subnet: int) -> bool:
    shown = subprocess.run(["ip", "link", "show", f"{netns.PREFIX}{subnet}-up"], check=False)
    return shown.returncode == 0


@pytest.mark.timeout(60)
def test_links_are_capped_both_ways_and_everything_is_removed_on_exit():
    with netns.ShapedNetwork(netns.NetworkSpec(2, f"{CAP_MBIT}mbit")) as net:
        subnet = net.subnet
        assert sorted(namespaces_of(subnet)) == [
            f"gck{subnet}-m0",
            f"gck{subnet}-m1",
            f"gck{subnet}-sw",
        ]
        assert uplink_exists(subnet)
        rates = [measure_mbit(net, 0, 1), measure_mbit(net, 1, 0)]
    # Each direction is shaped at the sender's egress: machine side one way, switch side back.
    for rate in rates:
        assert 0.5 * CAP_MBIT <= rate <= 1.2 * CAP_MBIT, rates
    assert namespaces_of(subnet) == []
    assert not uplink_exists(subnet)


CRASHING_TEST_BED = textwrap.dedent(
    """
    import subprocess, sys
    from gemini_ckpt.testbed import netns
    net = netns.ShapedNetwork(netns.NetworkSpec(2, "1gbit")).start()
    # Something still running inside a machine when the test bed dies.
    subprocess.Popen([*net.exec_prefix(1), "sleep", "300"], start_new_session=True)
    print(net.subnet, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.timeout(60)
def test_cleanup_removes_what_a_killed_test_bed_left_behind():
    with subprocess.Popen(
        [sys.executable, "-c", CRASHING_TEST_BED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as bed:
        assert bed.stdout is not None
        subnet = int(bed.stdout.readline())
        bed.send_signal(signal.SIGKILL)  # no __exit__, no close()
    assert len(namespaces_of(subnet)) == 3
    left = subprocess.run(
        ["ip", "netns", "pids", f"gck{subnet}-m1"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert left, "the sleep inside machine 1 should have outlived its test bed"

    removed = netns.remove_stale_networks()

    assert namespaces_of(subnet) == []
    assert f"gck{subnet}-sw" in removed
    assert not uplink_exists(subnet)
    time.sleep(0.2)  # SIGKILL is delivered asynchronously
    assert not [pid for pid in left if alive(int(pid))]


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie no longer does: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


SCRIPT = Path(train_gpt.__file__)
STEPS = 10


def run_job(run_dir: Path, faults: tuple[str, ...], shaped: bool) -> tuple[LocalTestbed, set[str]]:
    """Run the tiny GPT on 2 machines x 1 rank; also return the namespaces its trainers ran in."""
    args = ("--steps", str(STEPS), "--d-model", "32", "--layers", "1", "--batch", "4")
    spec = LocalSpec(
        machines=2,
        nproc_per_machine=1,
        script=SCRIPT,
        script_args=(*args, "--seq", "16", "--final-state", str(run_dir / "final")),
        faults=faults,
        run_dir=run_dir,
        member_ttl_s=2,
        replicas=2,
        netns=shaped,
        link_bandwidth="1gbit" if shaped else "",
    )
    inside: set[str] = set()
    with LocalTestbed(spec) as bed:
        deadline = time.monotonic() + 150
        while bed.poll() is None and time.monotonic() < deadline:
            inside |= trainer_namespaces(bed)
            time.sleep(0.2)
        code = bed.wait(5)
    assert code == 0, "\n".join(bed.agent_log(m)[-3000:] for m in range(2))
    return bed, inside


def trainer_namespaces(bed: LocalTestbed) -> set[str]:
    """The namespaces generation 0's trainers run in now, each found in its own machine's."""
    found = set()
    for record in read_events(bed.event_files()):
        if record.get("event") != ev.GENERATION_STARTED or record.get("generation") != 0:
            continue
        for pid in (record.get("pids") or {}).values():
            identify = subprocess.run(
                ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=False
            )
            name = identify.stdout.strip()
            if name.endswith(f"-m{record['machine']}"):
                found.add(name)
    return found


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_a_machine_lost_on_the_shaped_network_restores_from_its_peer(tmp_path):
    reference, _ = run_job(tmp_path / "reference", (), shaped=False)
    assert reference.summary().recoveries == []

    bed, inside = run_job(tmp_path / "shaped", ("kill-machine@step=6,machine=1",), shaped=True)

    assert len(inside) == 2, f"each trainer should run in its machine's namespace: {inside}"
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.sources == {0: LOCAL_MEMORY, 1: peer_source(0)}
    fetched = [e for e in read_events(bed.event_files()) if e["event"] == ev.REPLICA_FETCHED]
    assert [(e["rank"], e["machine"]) for e in fetched] == [(1, 0)]
    assert (
        final_state.compare_dirs(tmp_path / "reference" / "final", tmp_path / "shaped" / "final", 2)
        == []
    )
    assert not inside & set(netns.our_namespaces()), "the job's namespaces outlived it"
