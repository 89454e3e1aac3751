"""`gemini-ckpt status`: what a job is doing, from one read of its records in etcd (read-only).

`assemble` (pure) turns the keys `coordination/control.py` and `job.py` describe into the status
(the JSON output); `status_render.render_table` (pure) prints it. etcd keeps no time of an
election (bracketed by records written before and after it), and the client has no call for a
lease's TTL left.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from gemini_ckpt.cli.status_render import render_table
from gemini_ckpt.config import EtcdClientConfig, env_default, parse_endpoints
from gemini_ckpt.coordination.control_kv import ControlKV, KeyValue
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.errors import CoordinationError

ROOT = "gemini/"

Records = Mapping[str, KeyValue]
"""A job's keys, relative to `gemini/<job>/`."""

# -- reading ---------------------------------------------------------------------------------------


def job_names(keys: list[str]) -> list[str]:
    """The jobs that have a generation counter among `keys` (full keys; pure)."""
    parts = [key.removeprefix(ROOT).split("/") for key in keys if key.startswith(ROOT)]
    return sorted({p[0] for p in parts if len(p) == 2 and p[1] == "generation"})


def list_jobs(kv: ControlKV) -> list[str]:
    """Every job with records in etcd."""
    return job_names([item.key for item in kv.get_prefix(ROOT).items])


def read_job(kv: ControlKV, job: str) -> dict[str, KeyValue]:
    """Every record of `job`, keyed by name relative to `gemini/<job>/`."""
    prefix = f"{ROOT}{job}/"
    return {item.key.removeprefix(prefix): item for item in kv.get_prefix(prefix).items}


# -- assembling (pure) -----------------------------------------------------------------------------


def _value(records: Records, name: str) -> Any:
    item = records.get(name)
    if item is None:
        return None
    try:
        return json.loads(item.value)
    except ValueError:
        return item.value.decode("utf-8", "replace")


def _record(records: Records, name: str) -> dict[str, Any]:
    """A JSON object record, or {} if absent or not an object."""
    value = _value(records, name)
    return value if isinstance(value, dict) else {}


def _by_machine(records: Records, prefix: str) -> dict[int, dict[str, Any]]:
    out = {}
    for name in records:
        rest = name.removeprefix(prefix)
        if name.startswith(prefix) and rest.startswith("m") and rest[1:].isdigit():
            out[int(rest[1:])] = _record(records, name)
    return out


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


# Per record kind, the field that says when its latest write was made.
_STAMPS = {
    "timeline/": "planned_at",
    "operator/replaced/": "replaced_at",
    "status/": "at",
    "members/": "started_at",
}


def _stamp(records: Records, name: str) -> float | None:
    field = next((f for prefix, f in _STAMPS.items() if name.startswith(prefix)), None)
    return None if field is None else _num(_record(records, name).get(field))


def _bracket(records: Records, revision: int) -> tuple[float | None, float | None]:
    """(latest time stamped on a record written before `revision`, earliest one after it)."""
    before: list[float] = []
    after: list[float] = []
    for name, item in records.items():
        at = _stamp(records, name)
        if at is not None and item.mod_revision != revision:
            (before if item.mod_revision < revision else after).append(at)
    return max(before, default=None), min(after, default=None)


def root_view(records: Records) -> dict[str, Any] | None:
    """The elected root: machine, fencing revision, when it was elected (bracketed)."""
    leader = records.get("root/leader")
    if leader is None:
        return None
    candidate = leader.value.decode("utf-8", "replace")
    after, before = _bracket(records, leader.create_revision)
    return {
        "candidate": candidate,
        "machine": int(candidate[1:]) if candidate[1:].isdigit() else None,
        "revision": leader.create_revision,
        "elected_after": after,
        "elected_before": before,
    }


def machines_view(records: Records, generation: int) -> list[dict[str, Any]]:
    """One entry per machine: lease, member record, last report, failed ranks now."""
    members = _by_machine(records, "members/")
    statuses = _by_machine(records, "status/")
    inventories = _by_machine(records, f"gen{generation}/inventory/")
    replaced = _by_machine(records, "operator/replaced/")
    done = _by_machine(records, f"gen{generation}/done/")
    ids = sorted(set(members) | set(statuses) | set(inventories) | set(replaced))
    # Ranks nobody names (a finished job, a new machine's empty memory): torchrun's layout.
    world = len(_record(records, f"gen{generation}/plan").get("sources") or {})
    per = world // len(ids) if ids and world % len(ids) == 0 else 0
    out = []
    for m in ids:
        member, status = members.get(m, {}), statuses.get(m, {})
        ranks = member.get("ranks") or sorted(int(r) for r in inventories.get(m, {}))
        current = status.get("generation") == generation
        lease = records[f"members/m{m}"].lease if m in members else 0
        out.append(
            {
                "machine": m,
                "alive": m in members,
                "lease": f"{lease:x}" if lease else None,
                "lease_ttl_left_s": None,
                "pid": member.get("pid"),
                "host": member.get("host"),
                "ranks": ranks or list(range(m * per, (m + 1) * per)),
                "started_at": member.get("started_at"),
                "reported_generation": status.get("generation"),
                "last_step": status.get("last_step"),
                "reported_at": status.get("at"),
                "failed_ranks": status.get("failed_ranks", []) if current else [],
                "hang": status.get("hang") if current else None,
                "done": m in done,
                "replaced_at": replaced.get(m, {}).get("replaced_at"),
                "memory": status.get("memory"),
                "replica_lag": status.get("replica_lag"),
                "interleave": status.get("interleave"),
            }
        )
    return out


def ranks_view(
    records: Records, generation: int, machines: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per rank: the newest step every rank committed (or its machine reported), and its source."""
    plan = _record(records, f"gen{generation}/plan")
    sources = {int(r): str(s) for r, s in dict(plan.get("sources") or {}).items()}
    owner = {int(r): m["machine"] for m in machines for r in m["ranks"]}
    reported = {
        m["machine"]: m["last_step"] for m in machines if m["reported_generation"] == generation
    }
    marker = f"gen{generation}/complete/"
    complete = [int(n[len(marker) :]) for n in records if n.startswith(marker)]
    if plan.get("step") is not None:
        complete.append(int(plan["step"]))
    out = []
    for rank in sorted(set(sources) | set(owner)):
        known = [s for s in (*complete, reported.get(owner.get(rank, -1))) if s is not None]
        out.append(
            {
                "rank": rank,
                "machine": owner.get(rank),
                "latest_complete_step": max(known) if known else None,
                "restored_from": sources.get(rank),
            }
        )
    return out


def milestones(steps: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The steps that have a time, each with the seconds since the one before."""
    out: list[dict[str, Any]] = []
    for label, raw in steps:
        at = _num(raw)
        if at is not None:
            since = at - out[-1]["at"] if out else None
            out.append({"milestone": label, "at": at, "since_previous_s": since})
    return out


def timeline_view(records: Records) -> dict[str, Any] | None:
    """The newest recovery timeline: the root's incident record, replacements, agents' parts."""
    gens = [int(n[9:]) for n in records if n.startswith("timeline/") and n[9:].isdigit()]
    gens = [g for g in gens if g > 0]  # generation 0 is the job's start, not a recovery
    if not gens:
        return None
    g = max(gens)
    record = _record(records, f"timeline/{g}")
    steps = [("detected", record.get("detected_at")), ("decided", record.get("decided_at"))]
    steps += [
        (f"m{m} replaced", rep.get("replaced_at"))
        for m, rep in sorted(_by_machine(records, "operator/replaced/").items())
        if rep.get("generation") == g
    ]
    steps.append(("planned", record.get("planned_at")))
    parts = _by_machine(records, f"timeline/{g}/")
    agents = [
        (f"m{m} {field.removesuffix('_at').replace('_', ' ')}", at)
        for m, part in parts.items()
        for field, at in part.items()
        if field.endswith("_at") and _num(at) is not None
    ]
    marks = milestones(steps + sorted(agents, key=lambda s: float(s[1])))
    return {
        "generation": g,
        **{k: record.get(k) for k in ("kind", "reason", "machines", "step", "plan_reason")},
        "sources": record.get("sources", {}),
        "milestones": marks,
        "total_s": marks[-1]["at"] - marks[0]["at"] if marks else None,
        "agents": {str(m): p for m, p in sorted(parts.items())},
    }


def assemble(job: str, records: Records, now: float) -> dict[str, Any]:
    """The job's status from its records, read at wall-clock time `now` (pure)."""
    raw = _value(records, "generation")
    generation = int(raw) if isinstance(raw, int) else 0
    machines = machines_view(records, generation)
    failure = _value(records, "failed")
    ranks = ranks_view(records, generation, machines)
    if failure is not None:
        state = "failed"
    elif machines and all(m["done"] for m in machines):
        state = "finished"
    elif not any(m["alive"] for m in machines):
        state = "stopped (no agent alive)"
    else:
        state = "running"
    steps = [r["latest_complete_step"] for r in ranks if r["latest_complete_step"] is not None]
    return {
        "job": job,
        "read_at": now,
        "generation": generation,
        "state": state,
        "failure": None if failure is None else str(failure),
        "root": root_view(records),
        "machines": machines,
        "latest_complete_step": min(steps) if len(steps) == len(ranks) and steps else None,
        "ranks": ranks,
        "timeline": timeline_view(records),
    }


# -- command line ----------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `status`."""
    p = sub.add_parser(
        "status", help="show a job's machines, root, steps and last recovery", description=__doc__
    )
    etcd = env_default("GEMINI_ETCD")
    p.add_argument(
        "--etcd",
        default=etcd,
        required=etcd is None,
        help="the job's etcd cluster, HOST:PORT[,HOST:PORT...] (env GEMINI_ETCD)",
    )
    p.add_argument(
        "--run-id",
        default=env_default("GEMINI_RUN_ID", ""),
        help="the job (default: the only job in etcd) (env GEMINI_RUN_ID)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=env_default("GEMINI_OUTPUT", "table"),
        help="output format (env GEMINI_OUTPUT)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read the job's records and print its status; 2 if the job is ambiguous."""
    endpoints = parse_endpoints(args.etcd)
    where = ",".join(endpoints)
    with EtcdKV(EtcdClientConfig(endpoints)).start() as kv:
        jobs = [args.run_id] if args.run_id else list_jobs(kv)
        if len(jobs) > 1:
            listing = "".join(f"\n  {job}" for job in jobs)
            print(
                f"gemini-ckpt: {len(jobs)} jobs in etcd at {where}; pick one with --run-id:"
                + listing,
                file=sys.stderr,
            )
            return 2
        records = read_job(kv, jobs[0]) if jobs else {}
    if not records:
        what = f"job {jobs[0]!r} has no records" if jobs else "no Gemini job has records"
        raise CoordinationError(f"{what} in etcd at {where}")
    status = assemble(jobs[0], records, time.time())
    if args.output == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print("\n".join(render_table(status)))
    return 0
