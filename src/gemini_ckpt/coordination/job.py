"""Job-wide coordination between machine agents: membership, generations, restore plans, progress.

Written over `ControlKV` (etcd, or `MemoryKV` in unit tests). Each incarnation of the worker
group is a generation; the root opens a new one after a failure (see `control.py`), and every
agent restarts its workers into it.

Keys (under `gemini/<job>/`):
    joined/m<i>                    agent i is up
    generation                     the current generation (an integer)
    gen<g>/reason/m<i>             why agent i asked for generation g
    gen<g>/inventory/m<i>          steps held per rank on machine i, at the start of generation g
    gen<g>/replicas/m<i>           steps of other machines' ranks held as replicas by machine i
                                   (written before its inventory)
    gen<g>/plan                    the restore plan of generation g (written by the leader)
    gen<g>/worker_store            where generation g's workers rendezvous
    gen<g>/committed/<step>/m<i>   machine i has every local rank's `step` committed
    gen<g>/complete/<step>         present once all machines have
    gen<g>/done/m<i>               machine i's workers all exited successfully
    failed                         why the job gave up
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gemini_ckpt.coordination.control_kv import ControlKV, Delete, Op, Put
from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError

log = logging.getLogger(__name__)


class WaitAborted(CoordinationError):
    """A wait was cut short because the job moved on (a new generation, or it failed)."""


class JobCoordinator:
    """The coordination calls agents make; thread-safe as far as the KV is."""

    def __init__(self, kv: ControlKV, job: str, machines: int, poll_s: float = 0.005) -> None:
        self._kv = kv
        self._prefix = f"gemini/{job}/"
        self.machines = machines
        self._poll_s = poll_s
        # Steps this machine reported, newest last. Every machine reports the same sequence.
        self._reported: deque[int] = deque(maxlen=3)
        self._reported_generation = -1
        self._reported_lock = threading.Lock()

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _get_json(self, key: str) -> Any:
        raw = self._kv.get(self._key(key))
        return None if raw is None else json.loads(raw)

    def _set_json(self, key: str, value: Any) -> None:
        self._kv.set(self._key(key), json.dumps(value, separators=(",", ":")).encode())

    def _wait(
        self,
        what: str,
        probe: Callable[[], Any],
        timeout_s: float,
        abort: Callable[[], str | None] | None = None,
        *,
        patient: bool = True,
    ) -> Any:
        """Poll `probe` until it returns something other than None.

        A `patient` wait rides out etcd being briefly unavailable; otherwise that is raised.
        """
        deadline = time.monotonic() + timeout_s
        delay = self._poll_s
        while True:
            try:
                value = probe()
            except CoordinationUnavailableError as e:
                if not patient:
                    raise
                # etcd briefly away (a leader election, a restart): keep waiting for it.
                log.debug("still waiting for %s: %s", what, e)
                value = None
            if value is not None:
                return value
            reason = abort() if abort else None
            if reason:
                raise WaitAborted(f"stopped waiting for {what}: {reason}")
            if time.monotonic() >= deadline:
                raise CoordinationError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- membership ------------------------------------------------------------------------------

    def join(self, machine: int, timeout_s: float) -> None:
        """Announce this agent and wait until all machines have (the job's start barrier)."""
        self._kv.compare_set(self._key("generation"), None, b"0")
        self._kv.set(self._key(f"joined/m{machine}"), b"1")

        def everyone() -> bool | None:
            missing = [
                m for m in range(self.machines) if self._kv.get(self._key(f"joined/m{m}")) is None
            ]
            return True if not missing else None

        self._wait(f"all {self.machines} machines to join", everyone, timeout_s, self.failure)

    # -- generations -----------------------------------------------------------------------------

    def generation(self) -> int:
        """The current generation."""
        raw = self._kv.get(self._key("generation"))
        return int(raw) if raw is not None else 0

    def request_restart(self, machine: int, from_generation: int, reason: dict[str, Any]) -> int:
        """Move the job from `from_generation` to the next one; return the generation now current.

        A no-op if another agent already moved it.
        """
        target = from_generation + 1
        self._set_json(f"gen{target}/reason/m{machine}", reason)
        self._kv.compare_set(self._key("generation"), None, b"0")
        self._kv.compare_set(
            self._key("generation"), str(from_generation).encode(), str(target).encode()
        )
        return self.generation()

    def restart_reasons(self, generation: int) -> dict[int, Any]:
        """Why each machine asked for `generation`."""
        reasons = {}
        for m in range(self.machines):
            value = self._get_json(f"gen{generation}/reason/m{m}")
            if value is not None:
                reasons[m] = value
        return reasons

    # -- restore plan ----------------------------------------------------------------------------

    def publish_inventory(
        self,
        generation: int,
        machine: int,
        inventory: dict[int, list[int]],
        replicas: dict[int, list[int]] | None = None,
    ) -> None:
        """Record which steps this machine holds for each of its ranks, and of its peers' ranks.

        The replicas go first: a reader that sees the inventory sees them too. Retried while etcd
        is away, for up to a minute.
        """
        value = {str(r): s for r, s in inventory.items()}
        held = {str(r): s for r, s in (replicas or {}).items()}

        def put() -> bool:
            self._set_json(f"gen{generation}/replicas/m{machine}", held)
            self._set_json(f"gen{generation}/inventory/m{machine}", value)
            return True

        self._wait(f"etcd to record machine {machine}'s inventory", put, 60.0)

    def inventories_now(self, generation: int) -> dict[int, dict[int, list[int]]] | None:
        """Every machine's inventory for `generation` if all are published, else None."""
        out = {}
        for m in range(self.machines):
            raw = self._get_json(f"gen{generation}/inventory/m{m}")
            if raw is None:
                return None
            out[m] = {int(r): [int(s) for s in steps] for r, steps in raw.items()}
        return out

    def replicas_now(self, generation: int) -> dict[int, dict[int, list[int]]]:
        """The replicas each machine that published its inventory holds (rank -> steps)."""
        out = {}
        for m in range(self.machines):
            raw = self._get_json(f"gen{generation}/replicas/m{m}")
            if raw is not None:
                out[m] = {int(r): [int(s) for s in steps] for r, steps in raw.items()}
        return out

    def has_plan(self, generation: int) -> bool:
        """Whether generation `generation`'s plan is published."""
        return self._kv.get(self._key(f"gen{generation}/plan")) is not None

    def inventories(
        self, generation: int, timeout_s: float, abort: Callable[[], str | None]
    ) -> dict[int, dict[int, list[int]]]:
        """Every machine's inventory for `generation`, once all are published."""
        return dict(
            self._wait(
                f"inventories of generation {generation}",
                lambda: self.inventories_now(generation),
                timeout_s,
                abort,
            )
        )

    def publish_plan(
        self, generation: int, plan: dict[str, Any], worker_store: dict[str, Any]
    ) -> None:
        """Publish the restore plan and where workers rendezvous (the leader does this)."""
        self._set_json(f"gen{generation}/worker_store", worker_store)
        if plan.get("step") is not None:
            # Every rank holds the plan's step, so it is complete from the start.
            self._kv.set(self._key(f"gen{generation}/complete/{plan['step']}"), b"1")
        self._set_json(f"gen{generation}/plan", plan)

    def plan(
        self, generation: int, timeout_s: float, abort: Callable[[], str | None]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The restore plan and worker store address of `generation`, once published."""
        plan = self._wait(
            f"the restore plan of generation {generation}",
            lambda: self._get_json(f"gen{generation}/plan"),
            timeout_s,
            abort,
        )
        store = self._get_json(f"gen{generation}/worker_store")
        return dict(plan), dict(store)

    # -- progress --------------------------------------------------------------------------------

    def report_committed(self, generation: int, step: int, machine: int) -> None:
        """Machine `machine` has `step` committed for every local rank.

        Each machine writes a key of its own, so a report retried after etcd failed mid-call
        cannot count twice; whoever then sees every machine's key marks the step complete. One
        write per machine and step, without compare-and-swap races between machines.
        """
        with self._reported_lock:
            if generation != self._reported_generation:
                self._reported.clear()
                self._reported_generation = generation
            if not self._reported or self._reported[-1] != step:  # not when retried
                self._reported.append(step)
            oldest = self._reported[0] if len(self._reported) == self._reported.maxlen else None
        committed = self._key(f"gen{generation}/committed/")
        # Whoever waits on a step waits before writing the next one, so nobody can still be
        # waiting on the step reported two before this one: its keys can go.
        mine: list[Op] = [Put(f"{committed}{step}/m{machine}", b"1")]
        if oldest is not None:
            mine.append(Delete(f"{committed}{oldest}/m{machine}"))
        self._kv.txn([], mine)
        if len(self._kv.get_prefix(f"{committed}{step}/").items) < self.machines:
            return
        complete = self._key(f"gen{generation}/complete/")
        done: list[Op] = [Put(f"{complete}{step}", b"1")]
        if oldest is not None:
            done.append(Delete(f"{complete}{oldest}"))
        self._kv.txn([], done)

    def report_skipped(self, generation: int, step: int) -> None:
        """Some rank of this machine skipped `step`: it can never be common to all ranks."""
        self._kv.set(self._key(f"gen{generation}/skipped/{step}"), b"1")

    def wait_settled(
        self, generation: int, step: int, timeout_s: float, abort: Callable[[], str | None]
    ) -> str:
        """Wait until `step` is settled: "complete" or "skipped".

        Complete: every rank committed it. Skipped: some rank skipped it, so no rank keeps it.

        Raises:
            CoordinationUnavailableError: etcd cannot tell right now (the caller may skip the
                save instead of blocking training on etcd).
        """
        complete = self._key(f"gen{generation}/complete/{step}")
        skipped = self._key(f"gen{generation}/skipped/{step}")

        def probe() -> str | None:
            # Short reads: a stopped etcd must not hold a trainer's save for long.
            if self._kv.get(complete, timeout_s=0.5) is not None:
                return "complete"
            return "skipped" if self._kv.get(skipped, timeout_s=0.5) is not None else None

        return str(
            self._wait(f"all ranks to commit step {step}", probe, timeout_s, abort, patient=False)
        )

    def wait_complete(
        self, generation: int, step: int, timeout_s: float, abort: Callable[[], str | None]
    ) -> None:
        """Wait until every rank of the job has committed `step` (see `wait_settled`)."""
        key = self._key(f"gen{generation}/complete/{step}")
        self._wait(
            f"all ranks to commit step {step}",
            lambda: True if self._kv.get(key) is not None else None,
            timeout_s,
            abort,
        )

    def mark_done(self, generation: int, machine: int) -> None:
        """This machine's workers all finished successfully in `generation`."""
        self._kv.set(self._key(f"gen{generation}/done/m{machine}"), b"1")

    def done_machines(self, generation: int) -> set[int]:
        """The machines whose workers all finished successfully in `generation`."""
        return {
            m
            for m in range(self.machines)
            if self._kv.get(self._key(f"gen{generation}/done/m{m}")) is not None
        }

    def all_done(self, generation: int) -> bool:
        """Whether every machine's workers finished successfully in `generation`."""
        return len(self.done_machines(generation)) == self.machines

    # -- failure ---------------------------------------------------------------------------------

    def fail_job(self, reason: str) -> None:
        """Give up on the job; every agent stops."""
        self._kv.compare_set(self._key("failed"), None, reason.encode() or b"failed")

    def failure(self) -> str | None:
        """Why the job gave up, or None while it runs."""
        raw = self._kv.get(self._key("failed"))
        return None if raw is None else raw.decode()
