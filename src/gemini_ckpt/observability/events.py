"""Structured events: one JSON object per line, appended to a file per machine.

Events are what the progress display, the recovery summary and the tests read. Each line is
written with a single `write` on an O_APPEND descriptor, so lines from threads never interleave.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Event kinds, in the order a recovery produces them.
AGENT_STARTED = "agent_started"
GENERATION_STARTED = "generation_started"
PROGRESS = "progress"
MEMORY = "memory"
PERSISTED = "persisted"
PERSIST_FAILED = "persist_failed"
FAULT_INJECTED = "fault_injected"
WORKER_FAILED = "worker_failed"
HANG = "hang_detected"
RESTART = "restart"
PLAN = "plan"
PLAN_DECIDED = "plan_decided"
ROOT_ELECTED = "root_elected"
ROOT_LOST = "root_lost"
INCIDENT = "incident"
ETCD_RESUMED = "etcd_resumed"
STAGED = "staged"
RESTORED = "restored"
CORRUPT = "corrupt_checkpoint"
JOB_FINISHED = "job_finished"
STANDBY_ASSIGNED = "standby_assigned"
REPLICA_FETCHED = "replica_fetched"
"""A rank's checkpoint was pulled from a peer's replica before its trainer started."""
REPLICA_REJECTED = "replica_rejected"
"""This machine refused a peer's push (a chunk failed verification, no memory, ...)."""
PARTITIONED = "partitioned"
REPLICATED = "replicated"
"""A peer verified and committed a step of one rank (per push: the benchmarks count them)."""
INTERLEAVE_SCHEDULE = "interleave_schedule"
"""A machine's idle-span profile and the checkpoint schedule derived from it."""
"""The partition fault cut this machine's replication off for a while."""


class EventLog:
    """Appends events to `path`; `close()` releases the file. A `None` path discards events."""

    def __init__(self, path: Path | None, **common: Any) -> None:
        self._path = path
        self._common = common
        self._fd: int | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open the file for appending (idempotent)."""
        if self._path is not None and self._fd is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, /, **fields: Any) -> None:
        """Record one event with a wall-clock timestamp."""
        record = {"t": time.time(), "event": kind, **self._common, **fields}
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_events(paths: list[Path]) -> list[dict[str, Any]]:
    """All events from `paths`, merged in time order; unreadable lines are skipped."""
    events: list[dict[str, Any]] = []
    for path in paths:
        try:
            events.extend(parse_events(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue
    events.sort(key=lambda e: float(e.get("t", 0.0)))
    return events


def parse_events(text: str) -> Iterator[dict[str, Any]]:
    """The events in `text`, one JSON object per line."""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed writer
        if isinstance(record, dict):
            yield record
