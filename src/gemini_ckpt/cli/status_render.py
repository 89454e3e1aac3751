"""Rendering of `gemini-ckpt status` as text (pure): the status `status_cmd.assemble` built."""

from __future__ import annotations

import time
from typing import Any

from gemini_ckpt.config import format_size


def clock(at: float | None) -> str:
    """Local wall-clock time with milliseconds, or "-"."""
    millis = f".{int(at * 1000) % 1000:03d}" if at is not None else ""
    return time.strftime("%H:%M:%S", time.localtime(at)) + millis if at is not None else "-"


def _cell(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, float):
        return f"{value:+.3f} s"  # the only floats shown as they are: durations
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def grid(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Rows aligned in columns under `headers`."""
    cells = [headers, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _root_line(root: dict[str, Any] | None) -> str:
    if root is None:
        return "root      none elected"
    after, before = root["elected_after"], root["elected_before"]
    when = f"elected between {clock(after)} and {clock(before)}"
    if before is None:
        when = f"elected after {clock(after)}" if after is not None else "election time unknown"
    return f"root      {root['candidate']} (fencing revision {root['revision']}; {when})"


def _machine_rows(status: dict[str, Any]) -> list[str]:
    rows = []
    for m in status["machines"]:
        row = [m["machine"], f"alive {m['lease']}" if m["alive"] else "gone", m["pid"], m["host"]]
        row += [m["ranks"], m["reported_generation"], m["last_step"], clock(m["reported_at"])]
        rows.append([*row, m["failed_ranks"], "yes" if m["done"] else None, *_replication(m)])
    headers = ["machine", "lease", "pid", "host", "ranks", "reported gen", "step", "at"]
    replication = ["memory own+replicas", "replica lag", "interleaving"]
    return grid([*headers, "failed ranks", "done", *replication], rows)


def _replication(machine: dict[str, Any]) -> list[Any]:
    """Checkpoint memory held (own slots + peers' replicas) and steps each peer lags behind."""
    memory = machine.get("memory") or {}
    held = f"{format_size(memory['own'])}+{format_size(memory['replicas'])}" if memory else None
    lag = machine.get("replica_lag") or {}
    behind = [f"m{peer}:{'-' if steps is None else steps}" for peer, steps in sorted(lag.items())]
    return [held, behind, _interleaving(machine.get("interleave"))]


def _interleaving(state: dict[str, Any] | None) -> str | None:
    """Whether replication waits for idle network time, and how its chunks were granted."""
    if not state:
        return None
    if not state.get("profiled"):
        return "profiling"
    chunks = state.get("chunks", 0)
    return f"every {state.get('interval')} it, {state.get('in_window', 0)}/{chunks} in idle time"


def _timeline_lines(timeline: dict[str, Any] | None) -> list[str]:
    if timeline is None:
        return ["last recovery: none"]
    lines = [
        f"last recovery: generation {timeline['generation']}, {timeline['kind']}: "
        f"{timeline['reason']}",
        f"  restored step {_cell(timeline['step'])}: {_cell(timeline['plan_reason'])}",
    ]
    rows = [[m["milestone"], clock(m["at"]), m["since_previous_s"]] for m in timeline["milestones"]]
    lines += ["  " + line for line in grid(["milestone", "at", "since previous"], rows)]
    if timeline["total_s"] is not None:
        lines.append(f"  total {timeline['total_s']:.3f} s from first to last milestone")
    return lines


def render_table(status: dict[str, Any]) -> list[str]:
    """The status as text lines: job, root, machines, ranks, last recovery."""
    state = status["state"] + (f": {status['failure']}" if status["failure"] else "")
    lines = [
        f"job       {status['job']}  (read at {clock(status['read_at'])})",
        f"state     {state}",
        f"generation {status['generation']}",
        _root_line(status["root"]),
        f"latest step complete on every rank: {_cell(status['latest_complete_step'])}",
        "",
        *_machine_rows(status),
        "",
    ]
    rank_rows = [
        [r["rank"], r["machine"], r["latest_complete_step"], r["restored_from"]]
        for r in status["ranks"]
    ]
    lines += grid(["rank", "machine", "latest complete step", "restored from"], rank_rows)
    return [*lines, "", *_timeline_lines(status["timeline"])]
