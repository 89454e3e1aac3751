"""Executes the faults aimed at this machine's ranks, with real signals, once each.

`kill-worker` sends SIGKILL; `hang` sends SIGSTOP (the process stays, but makes no progress);
`corrupt-chunk` flips one byte of a committed copy (in memory, in a replica, on the wire, on disk)
so that only checksum verification can notice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from gemini_ckpt.faults import MACHINE_KINDS, FaultPoint, ResolvedFault
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)


class FaultInjector:
    """Decides when a fault fires; every fault fires at most once per job.

    `claim(fault)` is asked before a fault fires and must return True only once per job, also
    across agents (a replacement machine gets the same faults as the one it replaces).
    """

    def __init__(
        self,
        faults: Sequence[ResolvedFault],
        event_log: EventLog,
        claim: Callable[[ResolvedFault], bool] = lambda _: True,
    ) -> None:
        self._pending = list(faults)
        self._events = event_log
        self._claim = claim
        self._lock = threading.Lock()

    def machine_fault_due(self, step: int, is_root: bool) -> ResolvedFault | None:
        """The machine fault (or partition) to execute now that this machine completed `step`."""
        with self._lock:
            for fault in self._pending:
                if fault.kind not in (*MACHINE_KINDS, "partition") or step < fault.step:
                    continue
                if fault.kind == "kill-root" and not is_root:
                    continue
                self._pending.remove(fault)
                return fault if self._claim(fault) else None
        return None

    def failpoints(self, rank: int) -> list[dict[str, object]]:
        """Fault points the trainer of `rank` must report when it reaches them."""
        with self._lock:
            return [
                {"name": f.point.value, "step": f.step}
                for f in self._pending
                if f.rank == rank
                and f.point is not FaultPoint.AFTER_COMMIT
                and f.kind not in MACHINE_KINDS
            ]

    def _take(
        self, rank: int, step: int, point: FaultPoint, corrupt: str = "", *, due: bool = False
    ) -> ResolvedFault | None:
        """Remove and claim the fault of `rank` at `step` and `point`.

        With `corrupt`, a corrupt-chunk fault with that `where`; with `due`, the earliest fault
        at or before `step` (a step that was skipped must not make its fault vanish).
        """
        with self._lock:
            matching = [
                fault
                for fault in self._pending
                if (fault.rank, fault.point) == (rank, point)
                and (fault.step <= step if due else fault.step == step)
                and (fault.kind == "corrupt-chunk") == bool(corrupt)
                and fault.where == corrupt
            ]
            if not matching:
                return None
            fault = min(matching, key=lambda f: f.step)
            self._pending.remove(fault)
            return fault if self._claim(fault) else None

    def after_commit(self, rank: int, step: int, pid: int | None, store: LocalStore) -> bool:
        """Kill `rank` if a fault is due now that it committed `step`; True if it was killed.

        The first commit at or after the fault's step fires it: a save skipped while etcd could
        not vouch for it (during a leader election, say) must not make the fault vanish. A
        `corrupt-chunk` fault on this copy (where=memory) damages it in `store` instead.
        """
        corrupt = self._take(rank, step, FaultPoint.AFTER_COMMIT, "memory")
        if corrupt is not None:
            self._corrupt_slot(corrupt, store, step)
        return self._fire(self._take(rank, step, FaultPoint.AFTER_COMMIT, due=True), pid, step)

    def corrupt_in_flight(self, rank: int, step: int) -> int | None:
        """The chunk of `rank`'s `step` to damage on its way to a peer (where=flight), if any.

        The first push at or after the fault's step takes it: a sender behind the trainer skips
        steps, and the fault must not depend on which ones.
        """
        fault = self._take(rank, step, FaultPoint.AFTER_COMMIT, "flight", due=True)
        if fault is None:
            return None
        self._announce(fault, step, "flight")
        return fault.chunk

    def corrupt_replicas(self, replicas: LocalStore) -> None:
        """Damage a replica this machine holds once a where=replica fault's step is in it."""
        held = replicas.inventory()
        with self._lock:
            due = [
                f
                for f in self._pending
                if f.kind == "corrupt-chunk"
                and f.where == "replica"
                and any(s >= f.step for s in held.get(f.rank, ()))
            ]
        for fault in due:
            step = min(s for s in held[fault.rank] if s >= fault.step)
            if self._take(fault.rank, fault.step, fault.point, "replica") is not None:
                self._corrupt_slot(fault, replicas, step)

    def after_persisted(self, manifest: Manifest, path: str) -> None:
        """Damage the persisted copy just written, if a where=disk fault is due for it."""
        fault = self._take(manifest.rank, manifest.step, FaultPoint.AFTER_COMMIT, "disk")
        if fault is None:
            return
        with open(path, "r+b") as f:
            (header,) = struct.unpack("<Q", f.read(8))  # safetensors: u64 header length
        offset = 8 + header + min(fault.chunk * manifest.chunk_size, manifest.data_nbytes - 1)
        _flip_byte(Path(path), offset)
        self._announce(fault, manifest.step, f"disk ({path})")

    def _corrupt_slot(self, fault: ResolvedFault, store: LocalStore, step: int) -> None:
        ref = store.locate(fault.rank, step)
        if ref is None:
            return
        manifest = ref.manifest
        _flip_byte(ref.path, min(fault.chunk * manifest.chunk_size, manifest.data_nbytes - 1))
        self._announce(fault, step, f"{store.kind} memory ({ref.path})")

    def _announce(self, fault: ResolvedFault, step: int, where: str) -> None:
        log.warning(
            "fault %s: corrupting chunk %d of rank %d step %d in %s",
            fault.name,
            fault.chunk,
            fault.rank,
            step,
            where,
        )
        self._events.emit(
            events.FAULT_INJECTED,
            fault=fault.name,
            rank=fault.rank,
            step=step,
            point=fault.where,
            pid=os.getpid(),
            signal="none",
        )

    def at_failpoint(self, rank: int, name: str, step: int, pid: int | None) -> bool:
        """Kill `rank`, which reports it reached fault point `name` at `step`, if that is due."""
        try:
            point = FaultPoint(name)
        except ValueError:
            return False
        return self._fire(self._take(rank, step, point), pid, step)

    def _fire(self, fault: ResolvedFault | None, pid: int | None, step: int) -> bool:
        if fault is None or pid is None:
            return False
        sig = signal.SIGSTOP if fault.kind == "hang" else signal.SIGKILL
        log.warning(
            "fault %s: sending %s to rank %d (pid %d)", fault.name, sig.name, fault.rank, pid
        )
        self._events.emit(
            events.FAULT_INJECTED,
            fault=fault.name,
            rank=fault.rank,
            step=step,
            point=fault.point.value,
            pid=pid,
            signal=sig.name,
        )
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def kill_machine(
    emit: Callable[..., None],
    fault: ResolvedFault,
    step: int,
    machine_and_root: tuple[int, bool],
    pids: list[int],
    shm_dir: Path,
) -> None:
    """Take this whole machine down at once: trainers, shared memory, and the agent itself."""
    emit(
        events.FAULT_INJECTED,
        fault=fault.name,
        rank=-1,
        step=step,
        point="machine",
        pid=os.getpid(),
        signal="SIGKILL",
        machine=machine_and_root[0],
        root=machine_and_root[1],
    )
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(shm_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)
