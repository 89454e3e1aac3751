"""Leader election over `ControlKV`, and writes fenced by leadership.

One key per election (for the root agent: `gemini/<job>/root/leader`). Its value is the leader's
candidate id, it is attached to the leader's lease, and its `create_revision` is the leadership's
*fencing token*: a key created again after the old leader's lease expired has a new one. So a
write made through `fenced_txn` lands only if, at the revision it is applied, the key is still the
one this candidate created: a stale leader whose lease expired cannot write, even if its process
is alive and believes it leads.

Campaigning: a transaction creates the key with the candidate's lease if it is absent; otherwise
the candidate watches the key from the revision of that transaction (so a deletion in between is
not missed) and tries again when it goes, or every `poll_s` in any case. `decide_campaign` is the
pure decision, with the reason that is logged. A retried campaign whose first transaction was
applied but not answered finds its own key and wins with it.

Typical use by a root agent (one lease per agent, kept alive by `LeaseKeeper`)::

    election = Election(kv, "gemini/job/root/leader", candidate="m3")
    leadership = election.campaign(lease.id, timeout_s=1.0)  # None: someone else leads
    if leadership:
        fenced_txn(kv, leadership, [Put("gemini/job/plan/7", plan)])  # NotLeaderError if deposed
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gemini_ckpt.coordination.control_kv import (
    Compare,
    ControlKV,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    Watch,
    WatchEvent,
)
from gemini_ckpt.coordination.watch import EventQueue
from gemini_ckpt.errors import CoordinationUnavailableError, NotLeaderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leader:
    """Who leads an election: the candidate, its lease, and the fencing token (`revision`)."""

    candidate: str
    lease: int
    revision: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Leader:
        """The leader recorded in the election key `kv`."""
        return cls(kv.value.decode("utf-8", "replace"), kv.lease, kv.create_revision)


@dataclass(frozen=True)
class Leadership:
    """What a won campaign returns, and what `fenced_txn` checks: the proof of leading `key`."""

    key: str
    candidate: str
    lease: int
    revision: int


@dataclass(frozen=True)
class CampaignDecision:
    """The outcome of one campaign round: `won` (or None) and why, for the log."""

    won: Leadership | None
    reason: str


def decide_campaign(key: str, candidate: str, lease: int, result: TxnResult) -> CampaignDecision:
    """Interpret the create-if-absent transaction of a campaign round (pure).

    `result` comes from `txn([absent(key)], [Put(key, candidate, lease), Get(key)], [Get(key)])`,
    so its only read is the election key after the transaction.
    """
    current = result.reads[0] if result.reads else None
    if current is None:
        return CampaignDecision(None, f"{key} vanished right after the transaction; retrying")
    holder = Leader.from_kv(current)
    mine = holder.candidate == candidate and holder.lease == lease
    if result.succeeded or mine:
        how = "won" if result.succeeded else "already held (an earlier try was applied)"
        return CampaignDecision(
            Leadership(key, candidate, lease, holder.revision),
            f"{candidate} leads {key}: {how}, fencing revision {holder.revision}",
        )
    if holder.candidate == candidate:
        return CampaignDecision(
            None,
            f"an earlier incarnation of {candidate} holds {key} under lease {holder.lease:x}; "
            "waiting for it to expire",
        )
    return CampaignDecision(
        None, f"{holder.candidate} leads {key} since revision {holder.revision}; waiting"
    )


def fence(leadership: Leadership) -> list[Compare]:
    """The compares that hold only while `leadership` is current (pure)."""
    return [
        Compare.create_revision(leadership.key, "==", leadership.revision),
        Compare.value(leadership.key, "==", leadership.candidate.encode()),
    ]


def check_fence(leadership: Leadership, current: KeyValue | None) -> str | None:
    """Why `leadership` is no longer current given the election key now, or None if it is."""
    if current is None:
        return f"{leadership.candidate} no longer leads {leadership.key}: nobody does"
    holder = Leader.from_kv(current)
    if holder.revision != leadership.revision or holder.candidate != leadership.candidate:
        return (
            f"{leadership.candidate} (elected at revision {leadership.revision}) no longer leads "
            f"{leadership.key}: {holder.candidate} does since revision {holder.revision}"
        )
    return None


def fenced_txn(
    kv: ControlKV,
    leadership: Leadership,
    success: Sequence[Op],
    compares: Sequence[Compare] = (),
    failure: Sequence[Op] = (),
    timeout_s: float | None = None,
) -> TxnResult:
    """Run `success` iff `leadership` is current and `compares` hold, in one transaction.

    If the leadership holds but a compare of `compares` fails, `failure` runs and the result
    (`succeeded` False) is returned; its first read is the election key, then `failure`'s reads.
    Not retried once sent (see `ControlKV.txn`).

    Raises:
        NotLeaderError: the election key is gone or belongs to another term; nothing was written.
        CoordinationUnavailableError: etcd did not answer, or the outcome is unknown.
    """
    result = kv.txn(
        [*fence(leadership), *compares],
        success,
        [Get(leadership.key), *failure],
        timeout_s=timeout_s,
    )
    if result.succeeded:
        return result
    reason = check_fence(leadership, result.reads[0])
    if reason is not None:
        log.warning("fenced write refused: %s", reason)
        raise NotLeaderError(reason)
    return result


class Election:
    """Campaign for, observe and resign one election key; see the module docstring.

    Holds no resources: every call uses `kv`, and a campaign's watches end with the call.
    """

    def __init__(self, kv: ControlKV, key: str, candidate: str, poll_s: float = 0.5) -> None:
        self.kv = kv
        self.key = key
        self.candidate = candidate
        self.poll_s = poll_s
        self._last_reason = ""

    def campaign(self, lease: int, timeout_s: float) -> Leadership | None:
        """Try to become the leader, holding the key with `lease`, for up to `timeout_s`.

        Idempotent: a candidate that already leads with this lease gets its leadership back.
        Returns None if another candidate still leads when the time is up.

        Raises:
            LeaseLostError: the key was free but `lease` does not exist (expired or revoked);
                while another candidate leads, a dead lease goes unnoticed here (`LeaseKeeper`
                reports it).
            CoordinationUnavailableError: etcd did not answer before the time was up.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                result = self.kv.txn(
                    [Compare.absent(self.key)],
                    [Put(self.key, self.candidate.encode(), lease), Get(self.key)],
                    [Get(self.key)],
                    timeout_s=max(remaining, 0.001),
                )
            except CoordinationUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.05, self.poll_s))
                continue  # the next round finds out whether this one was applied
            decision = decide_campaign(self.key, self.candidate, lease, result)
            self._log(decision.reason)
            if decision.won is not None:
                return decision.won
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wait_for_delete(result.revision + 1, min(remaining, self.poll_s))

    def leader(self, timeout_s: float | None = None) -> Leader | None:
        """The current leader, or None if nobody leads."""
        current = self.kv.get_kv(self.key, timeout_s=timeout_s)
        return None if current is None else Leader.from_kv(current)

    def resign(self, leadership: Leadership, timeout_s: float | None = None) -> bool:
        """Give up `leadership` (delete the key iff it is still ours); whether it was ours.

        Idempotent; not retried once sent (see `ControlKV.txn`).
        """
        result = self.kv.txn(fence(leadership), [Delete(self.key)], timeout_s=timeout_s)
        if result.succeeded:
            log.info("%s resigned from %s", self.candidate, self.key)
        return result.succeeded

    def observe(
        self, callback: Callable[[Leader | None], None], timeout_s: float | None = None
    ) -> Watch:
        """Call `callback` with the current leader now, then on the watch thread at each change.

        The caller cancels the returned watch.
        """
        snapshot = self.kv.get_prefix(self.key, timeout_s=timeout_s)
        current = next((kv for kv in snapshot.items if kv.key == self.key), None)
        callback(None if current is None else Leader.from_kv(current))

        def on_event(event: WatchEvent) -> None:
            if event.key != self.key:
                return
            if event.kind == "delete":
                callback(None)
            else:
                callback(
                    Leader(
                        event.value.decode("utf-8", "replace"), event.lease, event.create_revision
                    )
                )

        return self.kv.watch_prefix(
            self.key, on_event, start_revision=snapshot.revision + 1, timeout_s=timeout_s
        )

    def _wait_for_delete(self, start_revision: int, timeout_s: float) -> None:
        """Wait until the key is deleted at or after `start_revision`, or `timeout_s` passes."""
        events = EventQueue()
        deadline = time.monotonic() + timeout_s
        try:
            watch = self.kv.watch_prefix(
                self.key, events.put, start_revision=start_revision, timeout_s=timeout_s
            )
        except CoordinationUnavailableError:
            return  # the next round reports what is wrong
        with watch:
            while (remaining := deadline - time.monotonic()) > 0:
                event = events.get(remaining)
                if event is not None and event.key == self.key and event.kind == "delete":
                    return

    def _log(self, reason: str) -> None:
        if reason != self._last_reason:
            log.info("election: %s", reason)
            self._last_reason = reason
