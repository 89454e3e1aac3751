"""The cluster operator of the one-host test bed: it replaces machines when the root asks.

The root never calls an operator: it writes a replacement request into etcd
(`operator/requests/m<i>`), so any operator that can watch etcd can serve it (this one, a
Kubernetes controller, a cloud auto-scaling hook). This one makes sure everything of the lost
machine is gone (its agent's process group, trainers left behind, its shared memory), brings up an
agent for the same machine index with fresh, empty memory (a warm standby when one waits, else a
new process), and acknowledges the request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.errors import CoordinationError

log = logging.getLogger(__name__)


class LocalProcessOperator:
    """`start()` to serve replacement requests on a named thread; `close()` to stop."""

    def __init__(
        self,
        plane: ControlPlane,
        retire: Callable[[int], None],
        launch: Callable[[int, int], dict[str, Any]],
        poll_s: float = 0.1,
    ) -> None:
        self._plane = plane
        self._retire = retire
        self._launch = launch
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replacements: list[dict[str, Any]] = []

    def start(self) -> None:
        """Serve requests until `close()`."""
        self._thread = threading.Thread(target=self._run, name="gemini-operator", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop serving (a replacement under way completes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                requests = self._plane.replacement_requests()
                done = self._plane.replaced()
            except CoordinationError as e:
                log.warning("operator cannot read requests: %s", e)
                continue
            for machine, request in sorted(requests.items()):
                if done.get(machine, {}).get("generation") != request.get("generation"):
                    self._replace(machine, request)

    def _replace(self, machine: int, request: dict[str, Any]) -> None:
        started = time.time()
        log.warning("operator: replacing machine %d (%s)", machine, request.get("reason"))
        self._retire(machine)
        how = self._launch(machine, int(request.get("generation") or 0))
        record = {
            "generation": request.get("generation"),
            "requested_at": request.get("at"),
            "started_at": started,
            "replaced_at": time.time(),
            **how,
        }
        try:
            self._plane.report_replaced(machine, record)
        except CoordinationError as e:
            log.error("operator could not acknowledge machine %d: %s", machine, e)
        self.replacements.append({"machine": machine, **record})
