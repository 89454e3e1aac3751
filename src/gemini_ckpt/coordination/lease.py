"""Keeping a lease alive: membership and root election both hang their keys on one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gemini_ckpt.coordination.control_kv import ControlKV, Lease
from gemini_ckpt.errors import CoordinationError, LeaseLostError

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps one lease alive from a named thread and says when it is lost.

    Refreshes every TTL/3. A refresh that fails for lack of a server is retried every TTL/10;
    the lease counts as lost when the server says it is gone, or when a whole TTL passed since
    the last refresh that succeeded was sent (the server may have let it expire by then). Then
    `on_lost(reason)` runs once on the keeper's thread and the thread ends. Call order:
    `start()`, then `close()` (which revokes the lease unless told not to).
    """

    def __init__(
        self,
        kv: ControlKV,
        lease: Lease,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self.lease = lease
        self._on_lost = on_lost
        self._clock = clock
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._reason: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"gemini-lease-{lease.id:x}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        """Start refreshing; returns self."""
        self._thread.start()
        return self

    @property
    def lost(self) -> str | None:
        """Why the lease was lost, or None while it is held."""
        return self._reason if self._lost.is_set() else None

    def wait_lost(self, timeout_s: float) -> str | None:
        """Wait up to `timeout_s` for the lease to be lost; the reason, or None if still held."""
        self._lost.wait(timeout_s)
        return self.lost

    def close(self, revoke: bool = True, timeout_s: float = 5.0) -> None:
        """Stop refreshing, join the thread, and revoke the lease if `revoke` (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if revoke and not self._lost.is_set():
            try:
                self._kv.revoke_lease(self.lease.id, timeout_s=timeout_s)
            except CoordinationError as e:
                log.warning(
                    "could not revoke lease %x: %s (it expires by itself)", self.lease.id, e
                )
            self._declare_lost("revoked by its holder", notify=False)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _declare_lost(self, reason: str, notify: bool = True) -> None:
        self._reason = reason
        self._lost.set()
        if notify and self._on_lost is not None:
            try:
                self._on_lost(reason)
            except Exception:
                log.exception("on_lost of lease %x failed", self.lease.id)

    def _run(self) -> None:
        ttl = self.lease.ttl_s
        expires = self._clock() + ttl
        wait = 0.0
        while not self._stop.wait(wait):
            sent = self._clock()
            try:
                ttl = self._kv.refresh_lease(self.lease.id, timeout_s=max(ttl / 3, 0.1))
            except LeaseLostError as e:
                log.warning("lease %x lost: %s", self.lease.id, e)
                self._declare_lost(f"lease {self.lease.id:x} expired or was revoked")
                return
            except CoordinationError as e:
                if self._clock() >= expires:
                    log.warning("lease %x not refreshed within its TTL: %s", self.lease.id, e)
                    self._declare_lost(f"lease {self.lease.id:x} not refreshed within {ttl} s: {e}")
                    return
                wait = ttl / 10
                continue
            expires = sent + ttl
            wait = ttl / 3
