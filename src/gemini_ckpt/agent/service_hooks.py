"""What the trainer service keeps per connection, and what it tells the rest of the agent."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemini_ckpt.protocol.messages import Request


@dataclass
class Connection:
    """Per-connection state: its rank, its generation, and the step it is writing.

    A closed connection aborts only the write it began itself.
    """

    peer_pid: int = 0
    """The trainer's process id as the kernel reports it (not as the trainer claims)."""
    rank: int | None = None
    generation: int = -1
    writing: int | None = None


@dataclass(frozen=True)
class ServiceHooks:
    """What the agent wants to hear from the service as trainers report."""

    on_step: Callable[[int], None] | None = None
    """Every rank of this machine committed this step."""
    timeline: Callable[[int, dict[str, Any]], None] | None = None
    """Add fields to this machine's part of a generation's recovery timeline (may block on etcd;
    called from a reporter thread, never from a trainer's request)."""
    on_iteration: Callable[[int, int, dict[str, Any]], None] | None = None
    """A rank began or committed a save: (rank, step, the trainer's timing of that save, whose
    `iteration_start` is when the next iteration began). The begin comes first and on time; the
    commit may come much later when the copy waits for an idle span."""
    copy_by: Callable[[], float | None] | None = None
    """Seconds into an iteration by which a deferred local copy must be done (None: do not
    defer); sent with every `begin` grant."""
    handlers: Mapping[str, Callable[[Request], dict[str, Any]]] = field(default_factory=dict)
    """Requests answered by another part of the agent (`profile`, `replicated`)."""
