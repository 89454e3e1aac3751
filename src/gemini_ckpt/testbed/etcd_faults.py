"""Faults on the job's etcd, executed by the test bed that runs it.

Watches machine 0's progress events and, when the job reaches a fault's step, SIGKILLs an etcd
member (`kill-etcd-member`; with `member=leader`, the one that leads the raft group then) or
stops the server with SIGSTOP for a few seconds (`stop-etcd`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from gemini_ckpt.coordination.etcd_kv import raft_leader
from gemini_ckpt.coordination.etcd_server import EtcdServer
from gemini_ckpt.faults import LEADER_MEMBER, ResolvedFault
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog, parse_events

log = logging.getLogger(__name__)


class EtcdFaults:
    """`start()` to watch for the faults' steps on a named thread; `close()` to stop."""

    def __init__(
        self,
        server: EtcdServer,
        faults: list[ResolvedFault],
        progress_file: Path,
        event_log: EventLog,
    ) -> None:
        self._server = server
        self._pending = sorted(faults, key=lambda f: f.step)
        self._progress_file = progress_file
        self._events = event_log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gemini-etcd-faults", daemon=True)
        self._offset = 0
        self._step = 0

    def start(self) -> None:
        """Start watching (nothing to do without faults)."""
        if self._pending:
            self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop watching (a stopped etcd is continued first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while self._pending and not self._stop.wait(0.05):
            self._read_progress()
            while self._pending and self._step >= self._pending[0].step:
                self._fire(self._pending.pop(0))

    def _read_progress(self) -> None:
        try:
            with self._progress_file.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for record in parse_events(complete.decode("utf-8", errors="replace")):
            if record.get("event") == events.PROGRESS:
                self._step = max(self._step, int(record.get("step", 0)))

    def _fire(self, fault: ResolvedFault) -> None:
        member = fault.machine or 0
        if member == LEADER_MEMBER:
            leader = raft_leader(self._server.endpoints)
            if leader is None:
                log.warning("fault %s: no etcd member leads; killing member 0", fault.name)
            member = leader or 0
        self._events.emit(
            events.FAULT_INJECTED,
            fault=fault.name,
            rank=-1,
            step=self._step,
            point="etcd",
            pid=0,
            signal="SIGKILL",
            member=member,
        )
        if fault.kind == "kill-etcd-member":
            log.warning("fault %s: killing etcd member %d", fault.name, member)
            self._server.kill(member)
            return
        log.warning("fault %s: stopping etcd member %d for %d s", fault.name, member, fault.seconds)
        self._server.signal(member, signal.SIGSTOP)
        try:
            self._stop.wait(fault.seconds)
        finally:
            self._server.signal(member, signal.SIGCONT)
            self._events.emit(
                events.ETCD_RESUMED, member=member, t_stopped=fault.seconds, at=time.time()
            )
