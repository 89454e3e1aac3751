"""A warm standby: an agent process started ahead of need, waiting to be given a machine.

Replacing a lost machine costs a new agent's start-up (interpreter, torch and gRPC imports, the
etcd connection: about two seconds on a small host) on top of its trainers' own. A standby pays
that in advance: it connects to etcd, announces itself under `standby/<name>` with a lease of its
own, and waits. An operator that must replace machine i writes `standby/<name>/assign` (once, by
compare-and-set), and the standby becomes machine i's agent at once, with fresh, empty memory —
the same as a newly started one, minus the wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.coordination.lease import LeaseKeeper
from gemini_ckpt.errors import CoordinationError

log = logging.getLogger(__name__)


def await_assignment(
    plane: ControlPlane,
    coordinator: JobCoordinator,
    name: str,
    ttl_s: int,
    stop: threading.Event | None = None,
    poll_s: float = 0.05,
) -> tuple[int, float] | None:
    """Wait as standby `name` until an operator assigns a machine; (machine, seconds waited).

    None if the job ended (it failed, or `stop` was set) first. The standby's records are gone
    when this returns.

    Raises:
        CoordinationError: etcd could not be reached to announce the standby, or the standby's
            lease was lost (an operator may no longer see it; better to exit and be restarted).
    """
    stop = stop or threading.Event()
    started = time.monotonic()
    keeper = LeaseKeeper(plane.kv, plane.kv.grant_lease(ttl_s)).start()
    try:
        plane.register_standby(name, keeper.lease.id, {"pid": os.getpid(), "at": time.time()})
        log.info("standby %s ready for job %s", name, plane.prefix)
        polls = 0
        while not stop.wait(poll_s):
            if keeper.lost is not None:
                raise CoordinationError(f"standby {name} lost its lease: {keeper.lost}")
            polls += 1
            try:
                machine = plane.standby_assignment(name)
                # Whether the job is over is a read per machine: asked about once a second.
                ended = _job_ended(coordinator) if polls % 20 == 0 else None
            except CoordinationError as e:
                log.warning("standby %s cannot read its assignment yet: %s", name, e)
                continue
            if machine is not None:
                return machine, time.monotonic() - started
            if ended is not None:
                log.info("standby %s leaves: %s", name, ended)
                return None
        return None
    finally:
        keeper.close()
        try:
            plane.retire_standby(name)
        except CoordinationError as e:
            log.warning("standby %s could not remove its records: %s", name, e)


def _job_ended(coordinator: JobCoordinator) -> str | None:
    failed = coordinator.failure()
    if failed is not None:
        return f"the job failed ({failed})"
    if coordinator.all_done(coordinator.generation()):
        return "the job finished"
    return None
