"""Turning agent events into the live progress lines and the recovery summary a user reads."""

from __future__ import annotations

import time
from typing import Any

from gemini_ckpt.config import format_size
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.summary import RunSummary


def _ms(seconds: Any) -> str:
    return f"{float(seconds) * 1000:7.1f} ms"


def _progress(event: dict[str, Any]) -> str | None:
    if event.get("machine") != 0:
        return None
    loss = (event.get("metrics") or {}).get("loss")
    loss_text = f"loss {loss:7.4f}" if isinstance(loss, (int, float)) else "loss    n/a"
    return (
        f"step {event['step']:5d} | {loss_text} | iter {_ms(event.get('iteration_s', 0))}"
        f" | ckpt {_ms(event.get('blocking_s', 0))} blocking,"
        f" {_ms(event.get('copy_s', 0))} copy"
    )


def _fault(event: dict[str, Any]) -> str:
    sig = event.get("signal", "SIGKILL")
    if event.get("point") == "machine":
        return f"!! fault {event['fault']}: machine {event['machine']} is gone (agent and trainers)"
    return f"!! fault {event['fault']}: {sig} to rank {event['rank']} (pid {event['pid']})"


def _worker_failed(event: dict[str, Any]) -> str:
    line = (
        f"!! machine {event['machine']}: {event['description']}; last committed step "
        f"{event.get('last_committed')}"
    )
    tail = [t for t in str(event.get("stderr_tail") or "").splitlines() if t.strip()]
    if int(event.get("exitcode", 0)) > 0 and tail:
        line += f"\n   last error output: {tail[-1].strip()}"
    return line


_LINES: dict[str, Any] = {
    ev.PROGRESS: _progress,
    ev.FAULT_INJECTED: _fault,
    ev.WORKER_FAILED: _worker_failed,
    ev.INCIDENT: lambda e: f"!! root (machine {e['machine']}): {e['kind']}: {e['reason']}",
    ev.HANG: lambda e: f"!! machine {e['machine']}: {e['reason']}",
    ev.PLAN: lambda e: (
        f"-> generation {e['generation']}: {e['reason']}" if e.get("machine") == 0 else None
    ),
    ev.RESTORED: lambda e: (
        f"   rank {e['rank']} restored step {e['step']} from {e['source']} "
        f"in {_ms(e['seconds']).strip()}"
    ),
    ev.CORRUPT: lambda e: f"!! rank {e['rank']} step {e['step']} refused: {e['detail']}",
    ev.REPLICA_FETCHED: lambda e: (
        f"   rank {e['rank']} step {e['step']} pulled from machine {e['machine']}: "
        f"{e['nbytes'] / 2**20:.1f} MiB in {_ms(e['seconds']).strip()}"
    ),
    ev.REPLICA_REJECTED: lambda e: (
        f"!! machine {e['machine']} refused rank {e['rank']} step {e['step']} from a peer: "
        f"{e['reason']}"
    ),
}


def event_line(event: dict[str, Any]) -> str | None:
    """One console line for an event worth showing, or None."""
    render = _LINES.get(str(event.get("event")))
    return render(event) if render is not None else None


def summary_lines(summary: RunSummary) -> list[str]:
    """The recovery summary as text."""
    lines = [f"job {summary.status}; last completed step {summary.final_step}"]
    for machine, (reserved, budget) in sorted(summary.memory.items()):
        lines.append(
            f"machine {machine}: {format_size(reserved)} of checkpoint memory "
            f"(budget {format_size(budget)})"
        )
    if not summary.recoveries:
        lines.append("no failures")
    for r in summary.recoveries:
        when = time.strftime("%H:%M:%S", time.localtime(r.failed_at))
        lines += [
            f"recovery into generation {r.generation} ({r.kind}):",
            f"  failure seen at      {when} ({'; '.join(r.failures) or 'another machine failed'}),"
            f" detected {r.detected_at - r.failed_at:.2f} s later",
            f"  restored step        {r.restored_step}  ({r.reason})",
            f"  iterations lost      {r.iterations_lost} committed (plus the one in progress);"
            f" newest committed step before the failure: {r.highest_committed}",
            "  failure -> next step "
            + (f"{r.seconds_to_next_step:.2f} s" if r.seconds_to_next_step is not None else "n/a"),
        ]
        for rank, source in sorted(r.sources.items()):
            took = r.restore_seconds.get(rank)
            took_text = (
                f" (loaded and verified in {took * 1000:.1f} ms)" if took is not None else ""
            )
            lines.append(f"  rank {rank:<3d} state from {source}{took_text}")
    return lines
