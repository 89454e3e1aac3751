"""Turning agent events into the live progress lines and the recovery summary a user reads."""

from __future__ import annotations

import time
from typing import Any

from gemini_ckpt.config import format_size
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.summary import RunSummary


def _ms(seconds: Any) -> str:
    return f"{float(seconds) * 1000:7.1f} ms"


def event_line(event: dict[str, Any]) -> str | None:
    """One console line for an event worth showing, or None."""
    kind = event.get("event")
    if kind == ev.PROGRESS and event.get("machine") == 0:
        loss = (event.get("metrics") or {}).get("loss")
        loss_text = f"loss {loss:7.4f}" if isinstance(loss, (int, float)) else "loss    n/a"
        return (
            f"step {event['step']:5d} | {loss_text} | iter {_ms(event.get('iteration_s', 0))}"
            f" | ckpt {_ms(event.get('blocking_s', 0))} blocking,"
            f" {_ms(event.get('copy_s', 0))} copy"
        )
    if kind == ev.FAULT_INJECTED:
        sig = event.get("signal", "SIGKILL")
        return f"!! fault {event['fault']}: {sig} to rank {event['rank']} (pid {event['pid']})"
    if kind == ev.WORKER_FAILED:
        line = (
            f"!! machine {event['machine']}: {event['description']}; last committed step "
            f"{event.get('last_committed')}"
        )
        tail = [t for t in str(event.get("stderr_tail") or "").splitlines() if t.strip()]
        if int(event.get("exitcode", 0)) > 0 and tail:
            line += f"\n   last error output: {tail[-1].strip()}"
        return line
    if kind == ev.HANG:
        return f"!! machine {event['machine']}: {event['reason']}"
    if kind == ev.PLAN and event.get("machine") == 0:
        return f"-> generation {event['generation']}: {event['reason']}"
    if kind == ev.RESTORED:
        return (
            f"   rank {event['rank']} restored step {event['step']} from {event['source']} "
            f"in {_ms(event['seconds']).strip()}"
        )
    if kind == ev.CORRUPT:
        return f"!! rank {event['rank']} step {event['step']} refused: {event['detail']}"
    return None


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
            f"recovery into generation {r.generation}:",
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
