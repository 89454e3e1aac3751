"""The corrupt-chunk fault damages exactly one byte of the copy it names, once; the job secret's
fallback through etcd gives every agent the same secret."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from gemini_ckpt.agent.fault_injector import FaultInjector
from gemini_ckpt.agent.replicas import resolve_secret
from gemini_ckpt.config import AgentConfig
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.memory_kv import MemoryKV
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.faults import parse_fault, resolve_faults
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.protocol.manifest import Manifest, TensorEntry
from gemini_ckpt.store.local_store import LocalStore
from helpers.configs import agent_config

CHUNK = 64


def manifest(step: int, nbytes: int = 4 * CHUNK) -> Manifest:
    return Manifest(
        job="j",
        rank=1,
        world_size=2,
        step=step,
        generation=0,
        chunk_size=CHUNK,
        data_nbytes=nbytes,
        chunk_digests=("0" * 16,) * (nbytes // CHUNK),
        entries=(TensorEntry("uint8", (nbytes,), 0, nbytes),),
        tensor_refs=(0,),
        skeleton={"__tensor__": 0},
    )


def injector(text: str) -> FaultInjector:
    faults = resolve_faults([parse_fault(text)], machines=2, nproc_per_machine=1)
    return FaultInjector(faults, EventLog(None))


def committed_store(tmp_path: Path, step: int) -> LocalStore:
    store = LocalStore(tmp_path / "shm", budget=64 << 20)
    store.start()
    store.allocate(1, 4 * CHUNK)
    path = store.begin_write(1, store.prepare_write(1, step))
    path.write_bytes(bytes(range(256)) + bytes(path.stat().st_size - 256))
    store.commit(1, 0, manifest(step))
    return store


def test_memory_corruption_flips_one_byte_of_the_named_chunk_once(tmp_path):
    store = committed_store(tmp_path, 3)
    faults = injector("corrupt-chunk@step=3,rank=1,chunk=2")
    before = store.data_path(1, 0).read_bytes()
    assert faults.after_commit(1, 3, pid=None, store=store) is False  # nothing to kill
    after = store.data_path(1, 0).read_bytes()
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed == [2 * CHUNK]
    assert after[2 * CHUNK] == before[2 * CHUNK] ^ 0xFF
    faults.after_commit(1, 3, pid=None, store=store)  # fired once: nothing more changes
    assert store.data_path(1, 0).read_bytes() == after
    store.close()


def test_a_kill_whose_step_was_skipped_fires_at_the_next_commit(tmp_path):
    faults = injector("kill-worker@step=3,rank=1")
    victim = subprocess.Popen(["sleep", "30"])
    try:
        assert faults.after_commit(1, 2, victim.pid, store=None) is False
        assert faults.after_commit(0, 4, victim.pid, store=None) is False  # another rank
        assert faults.after_commit(1, 4, victim.pid, store=None) is True  # step 3 was skipped
        assert victim.wait(5) == -signal.SIGKILL
        assert faults.after_commit(1, 5, victim.pid, store=None) is False  # once per job
    finally:
        victim.kill()
        victim.wait()


def test_flight_and_replica_faults_are_taken_by_their_own_paths(tmp_path):
    flight = injector("corrupt-chunk@step=3,rank=1,where=flight,chunk=1")
    assert flight.corrupt_in_flight(1, 2) is None
    assert flight.corrupt_in_flight(0, 3) is None  # another rank
    assert flight.corrupt_in_flight(1, 4) == 1  # step 3 was never pushed: the next one is hit
    assert flight.corrupt_in_flight(1, 5) is None
    replicas = committed_store(tmp_path, 5)  # the replica of rank 1 held by its peer
    held = injector("corrupt-chunk@step=4,rank=1,where=replica")
    before = replicas.data_path(1, 0).read_bytes()
    held.corrupt_replicas(replicas)  # step 5 is the first replica at or after step 4
    after = replicas.data_path(1, 0).read_bytes()
    assert [i for i in range(len(before)) if before[i] != after[i]] == [0]
    replicas.close()


def test_disk_corruption_lands_in_the_data_after_the_safetensors_header(tmp_path):
    header = b'{"x":{}}'
    path = tmp_path / "rank-1.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4 * CHUNK))
    injector("corrupt-chunk@step=3,rank=1,where=disk,chunk=3").after_persisted(
        manifest(3), str(path)
    )
    data = path.read_bytes()[8 + len(header) :]
    assert [i for i, b in enumerate(data) if b] == [3 * CHUNK]


def config(tmp_path: Path, secret_file: Path | None = None) -> AgentConfig:
    return agent_config(tmp_path, job_secret_file=secret_file)


def test_without_a_secret_of_their_own_the_agents_share_one_through_etcd(tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_JOB_SECRET", raising=False)
    kv = MemoryKV()
    first = resolve_secret(config(tmp_path), ControlPlane(kv, "job", 2))
    second = resolve_secret(config(tmp_path), ControlPlane(kv, "job", 2))
    assert first == second and len(first) == 32
    assert resolve_secret(config(tmp_path), ControlPlane(kv, "other", 2)) != first


def test_a_secret_file_or_variable_wins_and_a_bad_one_is_an_error(tmp_path, monkeypatch):
    plane = ControlPlane(MemoryKV(), "job", 2)
    monkeypatch.setenv("GEMINI_JOB_SECRET", "s" * 20)
    assert resolve_secret(config(tmp_path), plane) == b"s" * 20
    secret = tmp_path / "secret"
    secret.write_text("f" * 24 + "\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="other users could read it"):
        resolve_secret(config(tmp_path, secret), plane)
    secret.chmod(0o600)
    assert resolve_secret(config(tmp_path, secret), plane) == b"f" * 24
    secret.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_secret(config(tmp_path, secret), plane)
