"""gRPC channels to the members of an etcd cluster: failover, retries, resumable watch streams.

This module knows gRPC, not etcd's messages: `etcd_kv.py` (the only module that imports an etcd
client) builds the requests and passes in the stubs. What it decides:

* One channel per endpoint; calls go to the current endpoint and move to the next one when it
  fails. An endpoint that failed (or was never used) is *suspect*: before the next request is sent
  there, a probe read must succeed on it within the attempt timeout, so a request that cannot be
  retried is only sent to a member that just answered. The probe fails fast on a member that
  refuses connections (a dead one costs a round trip, not an attempt timeout: waiting for it to
  come back would spend the call's whole budget there while the live members are idle); once
  every endpoint failed in one call, the call pauses briefly before the next round.
* `EndpointPool.call` retries a call on the next endpoint until its timeout runs out, unless told
  not to (transactions): then only a call that never left (the channel could not connect) is
  retried, and a failure after sending raises `CoordinationUnavailableError` saying the outcome
  is unknown.
* `ResumableWatch` keeps one watch stream open on a thread of its own and re-opens it on the next
  endpoint, from the revision after the last event it delivered, when the stream breaks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.control_kv import WatchEvent
from gemini_ckpt.coordination.watch import EventDispatcher
from gemini_ckpt.errors import CoordinationError, CoordinationUnavailableError, LeaseLostError

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Finds a peer that vanished without closing its connections; etcd accepts pings every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 << 20),
]
# A call that saw every member fail waits this long before the next round, doubling up to the max.
_ROUND_PAUSE_S = 0.05
_MAX_ROUND_PAUSE_S = 0.4
# Watch only on a member that has a leader: a member cut off from the others ends the stream.
_REQUIRE_LEADER = (("hasleader", "true"),)


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed call certainly never reached a server (so any call may be retried).

    gRPC fails a call at once, with this text, when its channel cannot connect; etcd's own Go
    client draws the same line from its gRPC library's error text.
    """
    return code == grpc.StatusCode.UNAVAILABLE and "failed to connect to all addresses" in str(
        details
    )


class Endpoint:
    """One member: its channel, the stubs built on it, and whether it is suspect."""

    def __init__(self, address: str, stubs: Callable[[grpc.Channel], Any]) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stubs = stubs(self.channel)
        self.suspect = True


Probe = Callable[[Endpoint, float], object]
"""A read that succeeds only on a member that is connected and serving, within the timeout."""


class EndpointPool:
    """The endpoints of one client and the current one; thread-safe.

    Call order: `open()`, `call()`s, `close()`.
    """

    def __init__(self, config: EtcdClientConfig) -> None:
        self.config = config
        self._endpoints: list[Endpoint] = []
        self._current = 0
        self._lock = threading.Lock()
        self._closed = False
        self._probe: Probe | None = None

    def open(self, stubs: Callable[[grpc.Channel], Any], probe: Probe) -> None:
        """Create a channel per endpoint (they connect on first use).

        `probe` is sent to a suspect endpoint before a request, so that a request is only sent
        to an endpoint that just answered.
        """
        with self._lock:
            self._probe = probe
            self._endpoints = [Endpoint(a, stubs) for a in self.config.endpoints]

    def close(self) -> None:
        """Close every channel; later calls raise `CoordinationError` (idempotent)."""
        with self._lock:
            self._closed = True
            endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            endpoint.channel.close()

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def pick(self) -> Endpoint:
        """The current endpoint.

        Raises:
            CoordinationError: the pool is not open, or closed.
        """
        with self._lock:
            if self._closed or not self._endpoints:
                raise CoordinationError("the etcd client is not started, or closed")
            return self._endpoints[self._current]

    def failed(self, endpoint: Endpoint) -> None:
        """Mark `endpoint` suspect and move to the next one, unless another caller already did."""
        with self._lock:
            endpoint.suspect = True
            if self._endpoints and self._endpoints[self._current] is endpoint:
                self._current = (self._current + 1) % len(self._endpoints)

    def call(
        self,
        what: str,
        rpc: Callable[[Endpoint, float], T],
        timeout_s: float | None,
        retry: bool = True,
    ) -> T:
        """Run `rpc(endpoint, attempt_timeout_s)`, failing over until `timeout_s` runs out.

        Raises:
            LeaseLostError: etcd answered that the lease named in the request does not exist.
            CoordinationUnavailableError: no endpoint answered in time (naming them all), or,
                with `retry` False, the connection was lost after sending (outcome unknown).
            CoordinationError: etcd refused the request (a bad argument, for example).
        """
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        failed_here: set[str] = set()
        pause = _ROUND_PAUSE_S
        while (remaining := deadline - time.monotonic()) > 0:
            if len(failed_here) >= len(set(self.config.endpoints)):
                # Every member failed once (all restarting, or refusing at once): pause rather
                # than spin through them, then go round again.
                time.sleep(min(pause, remaining))
                pause = min(2 * pause, _MAX_ROUND_PAUSE_S)
                failed_here.clear()
                continue
            endpoint = self.pick()
            attempt = min(remaining, self.config.attempt_timeout_s)
            if endpoint.suspect and (problem := self._check(endpoint, attempt)):
                errors.append(f"{endpoint.address}: {problem}")
                failed_here.add(endpoint.address)
                self.failed(endpoint)
                continue
            try:
                result = rpc(endpoint, attempt)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code == grpc.StatusCode.NOT_FOUND and "lease" in str(details):
                    raise LeaseLostError(f"etcd {what}: {details}") from e
                if code not in TRANSIENT:
                    raise CoordinationError(f"etcd {what} failed: {code.name}: {details}") from e
                failed_here.add(endpoint.address)
                self.failed(endpoint)
                if not retry and not never_sent(code, details):
                    raise CoordinationUnavailableError(
                        f"etcd {what} at {endpoint.address} failed ({code.name}: {details}); "
                        "it may or may not have been applied"
                    ) from e
                errors.append(f"{endpoint.address}: {code.name}: {details}")
                continue
            endpoint.suspect = False
            return result
        raise CoordinationUnavailableError(
            f"etcd {what} failed: no endpoint of {','.join(self.config.endpoints)} answered "
            f"within {timeout:g} s ({'; '.join(dict.fromkeys(errors[-3:])) or 'no attempt fitted'})"
        )

    def _check(self, endpoint: Endpoint, timeout_s: float) -> str | None:
        """Probe a suspect endpoint; None if it answered, else what went wrong."""
        if self._probe is None:
            return None
        try:
            self._probe(endpoint, timeout_s)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
        endpoint.suspect = False
        return None


class ResumableWatch:
    """One watch stream on a named thread, re-opened on the next endpoint when it breaks.

    `request(start_revision)` builds the stream's create request; `event(pb)` converts an event.
    Events go to `dispatcher`; a final error goes to `dispatcher.fail`. Call order: `start()`,
    then `cancel()`.
    """

    def __init__(
        self,
        pool: EndpointPool,
        name: str,
        start_revision: int,
        codec: tuple[Callable[[int], Any], Callable[[Any], WatchEvent]],
        dispatcher: EventDispatcher,
    ) -> None:
        self._pool = pool
        self._name = name
        self._next = start_revision
        self._request, self._event = codec
        self._dispatcher = dispatcher
        self._stop = threading.Event()
        self._created = threading.Event()
        self._error: CoordinationError | None = None
        self._call: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"gemini-etcd-{name}", daemon=True)

    def start(self, timeout_s: float) -> None:
        """Start both threads and wait until a member accepted the watch.

        Raises:
            CoordinationUnavailableError: no endpoint accepted it within `timeout_s`.
        """
        self._dispatcher.start()
        self._thread.start()
        if not self._created.wait(timeout_s):
            self.cancel()
            raise CoordinationUnavailableError(
                f"cannot start {self._name}: no endpoint of "
                f"{','.join(self._pool.config.endpoints)} accepted it within {timeout_s:g} s"
            )
        if self._error is not None:
            self.cancel()
            raise self._error

    def cancel(self, timeout_s: float = 5.0) -> None:
        """Stop the stream and join both threads (idempotent)."""
        self._stop.set()
        with self._lock:
            self._done.set()
            if self._call is not None:
                self._call.cancel()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout_s)
        self._dispatcher.cancel(timeout_s)

    def _requests(self, done: threading.Event) -> Iterator[Any]:
        yield self._request(self._next)
        done.wait()  # keeps the stream open until it ends or the watch is cancelled

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            endpoint = None
            try:
                endpoint = self._pool.pick()
                if self._stream(endpoint):
                    backoff = 0.05
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() not in TRANSIENT:
                    self._give_up(CoordinationError(f"etcd refused {self._name}: {e.details()}"))
                    return
                log.info("%s broke: %s", self._name, e.code())
            except CoordinationError as e:
                self._give_up(e)
                return
            if endpoint is None or self._stop.is_set():
                return
            log.info("%s resumes at revision %d on another endpoint", self._name, self._next)
            self._pool.failed(endpoint)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _give_up(self, error: CoordinationError) -> None:
        log.warning("%s stopped: %s", self._name, error)
        self._error = error
        self._created.set()
        self._dispatcher.fail(error)

    def _stream(self, endpoint: Endpoint) -> bool:
        """Run one stream until it ends; whether it got as far as being created."""
        done = threading.Event()
        with self._lock:
            if self._stop.is_set():
                return False
            self._done = done
            self._call = endpoint.stubs.watch.Watch(self._requests(done), metadata=_REQUIRE_LEADER)
        created = False
        try:
            for response in self._call:
                if response.compact_revision:
                    raise CoordinationError(
                        f"{self._name} cannot resume at revision {self._next}: etcd compacted "
                        f"its history up to revision {response.compact_revision}"
                    )
                if response.created:
                    if self._next == 0:
                        self._next = int(response.header.revision) + 1
                    created = True
                    self._created.set()
                if response.canceled:
                    log.info("etcd ended %s: %s", self._name, response.cancel_reason)
                    return created
                for pb in response.events:
                    event = self._event(pb)
                    self._next = event.revision + 1
                    self._dispatcher.push(event)
            return created
        finally:
            done.set()
