"""The control plane's records in etcd: membership, agents' reports, the root's fenced decisions.

Keys (under `gemini/<job>/`, next to those of `job.py`):
    members/m<i>            agent i is alive (attached to its lease: gone when the machine is)
    status/m<i>             what agent i last reported: generation, failed ranks, progress
    root/leader             the elected root (see `election.py`)
    operator/requests/m<i>  the root asks for machine i to be replaced (fulfilled by an operator)
    operator/replaced/m<i>  the operator says it started the replacement
    standby/<name>          a warm standby agent waits (attached to its lease)
    standby/<name>/assign   the machine index an operator gave it (written once)
    timeline/<g>            the root's record of the incident that opened generation g
    timeline/<g>/m<i>       agent i's part of it (restored, first step)

Agents write only their own keys; decisions (a new generation, a restore plan, a replacement
request) are written by the root in transactions fenced by its leadership, so a root that lost
its lease cannot write any of them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gemini_ckpt.coordination.control_kv import Compare, ControlKV, Put
from gemini_ckpt.coordination.election import Leadership, fenced_txn
from gemini_ckpt.errors import CoordinationError


class ControlPlane:
    """Reads and writes of the control-plane records of one job."""

    def __init__(self, kv: ControlKV, job: str, machines: int) -> None:
        self.kv = kv
        self.prefix = f"gemini/{job}/"
        self.machines = machines

    def key(self, name: str) -> str:
        """The full key of a record name."""
        return self.prefix + name

    @property
    def leader_key(self) -> str:
        """The root election's key."""
        return self.key("root/leader")

    def _json(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()

    def _by_machine(self, prefix: str) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for item in self.kv.get_prefix(self.key(prefix)).items:
            name = item.key.removeprefix(self.key(prefix))
            if name.startswith("m") and name[1:].isdigit():
                out[int(name[1:])] = json.loads(item.value)
        return out

    # -- agents ----------------------------------------------------------------------------------

    def join(self, machine: int, lease: int, record: dict[str, Any]) -> None:
        """Announce this machine's agent; the record lives as long as `lease`.

        The first agent of the job also creates the generation counter (at 0).
        """
        self.kv.compare_set(self.key("generation"), None, b"0")
        self.kv.put(self.key(f"members/m{machine}"), self._json(record), lease=lease)
        # A replacement that joined fulfils the request for it: from now on its lease speaks
        # for the machine (compare-and-set: a newer request must stay outstanding).
        key = self.key(f"operator/requests/m{machine}")
        raw = self.kv.get(key)
        if raw is not None:
            request = json.loads(raw)
            if "joined_at" not in request:
                self.kv.compare_set(key, raw, self._json({**request, "joined_at": time.time()}))

    def members(self) -> dict[int, dict[str, Any]]:
        """The machines whose agents are alive, with what they announced."""
        return self._by_machine("members/")

    def wait_members(self, timeout_s: float) -> None:
        """Wait until every machine of the job has an agent (the job's start barrier)."""
        deadline = time.monotonic() + timeout_s
        while len(self.members()) < self.machines:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.machines)) - set(self.members()))
                raise CoordinationError(
                    f"timed out after {timeout_s:.0f} s waiting for machine(s) {missing} to join"
                )
            time.sleep(0.05)

    def report(self, machine: int, record: dict[str, Any]) -> None:
        """Publish this agent's status (generation, failed ranks, progress)."""
        self.kv.put(self.key(f"status/m{machine}"), self._json(record))

    def statuses(self) -> dict[int, dict[str, Any]]:
        """Every agent's last status."""
        return self._by_machine("status/")

    def record_timeline(self, generation: int, machine: int | None, fields: dict[str, Any]) -> None:
        """Add to generation `generation`'s timeline (the root's part, or machine `machine`'s)."""
        key = self.key(f"timeline/{generation}" + (f"/m{machine}" if machine is not None else ""))
        current = self.kv.get(key)
        merged = {**(json.loads(current) if current else {}), **fields}
        self.kv.put(key, self._json(merged))

    def timeline(self, generation: int) -> dict[str, Any]:
        """Generation `generation`'s timeline: the root's record, each machine's under "parts"."""
        out: dict[str, Any] = {}
        parts: dict[int, Any] = {}
        for item in self.kv.get_prefix(self.key(f"timeline/{generation}")).items:
            rest = item.key.removeprefix(self.key(f"timeline/{generation}"))
            if rest == "":
                out.update(json.loads(item.value))
            elif rest.startswith("/m") and rest[2:].isdigit():
                parts[int(rest[2:])] = json.loads(item.value)
        # Not "machines": the root's record already uses that name for the incident's machines.
        return {**out, "parts": parts}

    def shared_secret(self, candidate: bytes) -> bytes:
        """The job's replication secret kept in etcd: `candidate` if this call created it.

        Only a fallback for jobs started without a secret of their own: whoever can read the
        job's keys in etcd can then authenticate as one of its agents.
        """
        self.kv.compare_set(self.key("secret"), None, candidate.hex().encode())
        stored = self.kv.get(self.key("secret"))
        if stored is None:
            raise CoordinationError("the job's shared secret vanished from etcd")
        return bytes.fromhex(stored.decode())

    def claim_fault(self, name: str) -> bool:
        """True for exactly one caller per job and fault `name` (faults fire once per job)."""
        return self.kv.compare_set(self.key(f"faults/{name}"), None, b"fired")

    def planned_restarts(self, current: int) -> int:
        """How many generations after the first got a plan (those that actually restarted)."""
        timelines = self.kv.get_prefix(self.key("timeline/")).items
        planned = set()
        for item in timelines:
            rest = item.key.removeprefix(self.key("timeline/"))
            if rest.isdigit() and 0 < int(rest) <= current and b"planned_at" in item.value:
                planned.add(int(rest))
        return len(planned)

    def replacement_requests(self) -> dict[int, dict[str, Any]]:
        """Outstanding and past requests to replace machines."""
        return self._by_machine("operator/requests/")

    def replaced(self) -> dict[int, dict[str, Any]]:
        """What the operator reported per machine it replaced."""
        return self._by_machine("operator/replaced/")

    def report_replaced(self, machine: int, record: dict[str, Any]) -> None:
        """The operator's acknowledgement that machine `machine` was replaced."""
        self.kv.put(self.key(f"operator/replaced/m{machine}"), self._json(record))

    # -- warm standby agents ----------------------------------------------------------------------

    def register_standby(self, name: str, lease: int, record: dict[str, Any]) -> None:
        """Announce standby `name` (ready to take a machine) for as long as `lease` lives."""
        self.kv.put(self.key(f"standby/{name}"), self._json(record), lease=lease)

    def standbys(self) -> dict[str, dict[str, Any]]:
        """Standbys alive and not yet assigned a machine."""
        out: dict[str, dict[str, Any]] = {}
        assigned = set()
        for item in self.kv.get_prefix(self.key("standby/")).items:
            name = item.key.removeprefix(self.key("standby/"))
            if name.endswith("/assign"):
                assigned.add(name.removesuffix("/assign"))
            elif "/" not in name:
                out[name] = json.loads(item.value)
        return {n: r for n, r in out.items() if n not in assigned}

    def assign_standby(self, name: str, machine: int, record: dict[str, Any]) -> bool:
        """Give standby `name` machine `machine`; False if it was already given one."""
        return self.kv.compare_set(
            self.key(f"standby/{name}/assign"), None, self._json({"machine": machine, **record})
        )

    def standby_assignment(self, name: str) -> int | None:
        """The machine standby `name` was given, or None yet."""
        value = self.kv.get(self.key(f"standby/{name}/assign"))
        return int(json.loads(value)["machine"]) if value is not None else None

    def retire_standby(self, name: str) -> None:
        """Remove standby `name`'s records (it became a machine, or it leaves)."""
        self.kv.delete(self.key(f"standby/{name}"))
        self.kv.delete(self.key(f"standby/{name}/assign"))

    # -- the root (fenced) ------------------------------------------------------------------------

    def advance_generation(
        self,
        leadership: Leadership,
        current: int,
        incident: dict[str, Any],
        replace: tuple[int, ...] = (),
    ) -> bool:
        """Open generation `current + 1` for `incident`, asking for `replace` machines first.

        One transaction, fenced by `leadership` and by the generation still being `current`.
        Returns False if another decision already moved the generation.

        Raises:
            NotLeaderError: this root no longer leads; nothing was written.
        """
        target = current + 1
        ops = [
            Put(
                self.key(f"operator/requests/m{m}"),
                self._json(
                    {"generation": target, "reason": incident.get("reason", ""), "at": time.time()}
                ),
            )
            for m in replace
        ]
        ops += [
            Put(self.key("generation"), str(target).encode()),
            Put(self.key(f"timeline/{target}"), self._json(incident)),
        ]
        result = fenced_txn(
            self.kv,
            leadership,
            ops,
            compares=[Compare.value(self.key("generation"), "==", str(current).encode())],
        )
        return result.succeeded

    def publish_plan(
        self,
        leadership: Leadership,
        generation: int,
        plan: dict[str, Any],
        worker_store: dict[str, Any],
    ) -> bool:
        """Publish generation `generation`'s restore plan, fenced by leadership and generation.

        Raises:
            NotLeaderError: this root no longer leads; nothing was written.
        """
        ops = [Put(self.key(f"gen{generation}/worker_store"), self._json(worker_store))]
        if plan.get("step") is not None:
            # Every rank holds the plan's step, so it is complete from the start.
            ops.append(Put(self.key(f"gen{generation}/complete/{plan['step']}"), b"1"))
        ops.append(Put(self.key(f"gen{generation}/plan"), self._json(plan)))
        result = fenced_txn(
            self.kv,
            leadership,
            ops,
            compares=[Compare.value(self.key("generation"), "==", str(generation).encode())],
        )
        return result.succeeded

    def fail_job(self, leadership: Leadership, reason: str) -> None:
        """End the job for every agent (fenced)."""
        fenced_txn(self.kv, leadership, [Put(self.key("failed"), reason.encode() or b"failed")])
