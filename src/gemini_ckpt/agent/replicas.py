"""This machine's part in peer replication: it holds its peers' replicas and sends them its own.

The placement (`placement/`) names, for every machine, the m - 1 peers that keep a copy of its
checkpoints. After each commit the sender threads (one per peer) push the newest committed step
of every local rank to their peer, from shared memory, without ever holding the slot: a trainer
that needs the slot for a newer step overwrites it, and the push of the older step is abandoned
(the next newest is sent instead). Training never waits on replication; the lag is reported.

Replicas are generation-scoped: while a recovery is being decided nothing is sent, the server
refuses pushes of any other generation, and replicas newer than the plan's step are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gemini_ckpt.agent.interleaving import TrafficShaper
from gemini_ckpt.config import AgentConfig, job_secret_from_env
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.errors import CorruptCheckpointError, ReplicationError
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.placement import place
from gemini_ckpt.protocol.messages import Request
from gemini_ckpt.recovery.plan import peer_source
from gemini_ckpt.replication import (
    SECRET_ENV,
    Credentials,
    PeerLink,
    PushStatus,
    ReplicaServer,
    ServerSettings,
    fetch_replica,
    load_secret,
    new_secret,
    parse_address,
)
from gemini_ckpt.store.budget import MemoryBudget
from gemini_ckpt.store.local_store import LocalStore

log = logging.getLogger(__name__)

_RETRY_S = 0.5

CorruptInFlight = Callable[[int, int], int | None]
"""`(rank, step) -> chunk index to corrupt on the wire` (the `corrupt-chunk` fault), or None."""


def resolve_secret(config: AgentConfig, plane: ControlPlane) -> bytes:
    """The secret agents authenticate each other with: the job's own, else one kept in etcd.

    Raises:
        ConfigError: the secret file or variable is unusable.
    """
    env_secret = job_secret_from_env()
    if config.job_secret_file is not None or env_secret:
        return load_secret(config.job_secret_file, {SECRET_ENV: env_secret} if env_secret else {})
    log.warning(
        "no --job-secret-file or %s: the agents share a secret kept in etcd, so whoever can read "
        "this job's etcd keys can also read and write its checkpoints' replicas",
        SECRET_ENV,
    )
    return plane.shared_secret(new_secret())


class ReplicaRole:
    """`start()`, then per generation `enter()` ... `resume()`; `close()` at the end."""

    def __init__(
        self,
        config: AgentConfig,
        own: LocalStore,
        budget: MemoryBudget,
        event_log: EventLog,
        corrupt_in_flight: CorruptInFlight = lambda _rank, _step: None,
    ) -> None:
        self._config = config
        self._own = own
        self._events = event_log
        self._corrupt = corrupt_in_flight
        self.placement, self.placement_reason = place(config.machines, config.effective_replicas)
        self.peers = self.placement.peers_of(config.machine)
        self.store = LocalStore(config.shm_dir / "replicas", budget, kind="replica")
        self._credentials: Credentials | None = None
        self._server: ReplicaServer | None = None
        self._generation = -1
        self._sending = False
        self._closed = False
        self._partitioned_until = 0.0
        self._addresses: dict[int, str] = {}
        self._sent: dict[int, dict[int, int]] = {peer: {} for peer in self.peers}
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.shaper = TrafficShaper(
            config.interleave, config.ranks, len(self.peers), self._shard_bytes, event_log
        )

    def _shard_bytes(self) -> int:
        """Bytes of this machine's newest checkpoint (every local rank's)."""
        total = 0
        for rank in self._config.ranks:
            step = self._own.latest(rank)
            ref = self._own.locate(rank, step) if step is not None else None
            total += ref.manifest.data_nbytes if ref is not None else 0
        return total

    @property
    def enabled(self) -> bool:
        """Whether this machine sends replicas (m > 1 and more than one machine)."""
        return bool(self.peers)

    def start(self, secret: bytes) -> str | None:
        """Start serving replicas and sending them; returns the address peers reach us at."""
        if not self.enabled:
            return None
        self._credentials = Credentials(self._config.job_id, secret)
        self.store.start()
        self._server = ReplicaServer(
            self._credentials,
            self.store,
            current_generation=lambda: self._generation,
            own=self._own,
            settings=ServerSettings(self._config.local_addr, self._config.replica_port),
            on_corrupt=self._rejected,
        )
        _host, port = self._server.start()
        for peer in self.peers:
            thread = threading.Thread(
                target=self._send_loop,
                args=(peer, self._credentials),
                name=f"replicate-to-m{peer}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        log.info("replicating to machine(s) %s (%s)", list(self.peers), self.placement_reason)
        return f"{self._config.local_addr}:{port}"

    def _rejected(self, rank: int, step: int, reason: str) -> None:
        self._events.emit(
            events.REPLICA_REJECTED,
            generation=self._generation,
            rank=rank,
            step=step,
            machine=self._config.machine,
            reason=reason,
        )

    def close(self) -> None:
        """Stop sending and serving; release the replicas' memory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)
        if self._server is not None:
            self._server.close()
        self.store.close()

    # -- generations ---------------------------------------------------------------------------

    def enter(self, generation: int) -> None:
        """A recovery begins: stop sending, refuse pushes of any other generation."""
        with self._cond:
            self._generation = generation
            self._sending = False
        self.shaper.enter(generation)

    def inventory(self) -> dict[int, list[int]]:
        """Complete replicas held, per rank of another machine."""
        return self.store.inventory() if self.enabled else {}

    def resume(self, plan_step: int | None) -> None:
        """The plan is applied: drop replicas newer than its step and send again.

        The peers' addresses must be known (`learn_addresses`, before staging needs them).
        """
        if not self.enabled:
            return
        self.store.truncate_after(plan_step if plan_step is not None else -1)
        with self._cond:
            # What peers hold changed with the recovery; pushing a step they hold is cheap.
            self._sent = {peer: {} for peer in self.peers}
            self._sending = True
            self._cond.notify_all()

    def learn_addresses(self, members: Mapping[int, Mapping[str, Any]]) -> None:
        """Where every machine's replication server listens, from the membership records."""
        with self._cond:
            self._addresses = {
                m: str(record["replica_addr"])
                for m, record in members.items()
                if record.get("replica_addr")
            }

    # -- sending -------------------------------------------------------------------------------

    def offer(self) -> None:
        """A local rank committed a step: wake the senders."""
        with self._cond:
            self._cond.notify_all()

    def service_hooks(self) -> dict[str, Any]:
        """What the trainer service passes on: iteration starts and two requests."""
        return {
            "on_iteration": self.shaper.iteration_started,
            "copy_by": self.shaper.copy_by,
            "handlers": {
                "profile": self.shaper.profile_request,
                "replicated": self.replicated_request,
            },
        }

    def replicated_request(self, request: Request) -> dict[str, Any]:
        """A trainer's `replicated`: wait until the peers hold its step (blocking checkpoints)."""
        if not self.enabled:
            return {"replicated": False}
        return {"replicated": self.wait_replicated(request["step"], float(request["timeout_s"]))}

    def wait_replicated(self, step: int, timeout_s: float) -> bool:
        """Wait until every peer holds `step` (or newer) of every local rank; True if so."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            return self._cond.wait_for(
                lambda: all(
                    self._sent[p].get(r, -1) >= step for p in self.peers for r in self._config.ranks
                ),
                timeout=max(0.0, deadline - time.monotonic()),
            )

    def lag(self) -> dict[int, int | None]:
        """Per peer: steps between the newest local commit and the newest it holds (None: none)."""
        newest = [self._own.latest(r) for r in self._config.ranks]
        if any(s is None for s in newest):
            return dict.fromkeys(self.peers)
        floor = min(s for s in newest if s is not None)
        with self._cond:
            return {
                p: (floor - min(self._sent[p].get(r, -1) for r in self._config.ranks))
                if all(r in self._sent[p] for r in self._config.ranks)
                else None
                for p in self.peers
            }

    def status(self) -> dict[str, Any]:
        """Checkpoint memory held (own slots, peers' replicas) and the replica lag per peer."""
        own, replicas = self._own.usage(), self.store.usage()
        return {
            "memory": {
                "own": sum(own.per_rank.values()),
                "replicas": sum(replicas.per_rank.values()),
                "budget": own.budget,
            },
            "replica_lag": {str(p): lag for p, lag in self.lag().items()},
            **self.shaper.status(),
        }

    def _work(self, peer: int) -> list[tuple[int, int]]:
        work = []
        for rank in self._config.ranks:
            step = self._own.latest(rank)
            if step is not None and step > self._sent[peer].get(rank, -1):
                work.append((rank, step))
        return work

    def _next_batch(self, peer: int) -> tuple[list[tuple[int, int]], int, str] | None:
        """Wait for something to send to `peer`: (rank/step pairs, generation, address)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or (self._sending and bool(self._work(peer))), timeout=1.0
            )
            if self._closed:
                return None
            if (
                not self._sending
                or self._partitioned_until > time.monotonic()
                or not self.shaper.ready()
            ):
                return [], self._generation, ""
            return self._work(peer), self._generation, self._addresses.get(peer, "")

    def _send_loop(self, peer: int, credentials: Credentials) -> None:
        link: PeerLink | None = None
        failing = False
        while (batch := self._next_batch(peer)) is not None:
            work, generation, target = batch
            if not work or not target:
                time.sleep(0.1 if not work else _RETRY_S)  # paused, partitioned or address unknown
                continue
            if link is None or link.where != target:
                if link is not None:
                    link.close()
                link = PeerLink(parse_address(target), credentials)
                link.where = target
            for rank, step in work:
                failure = self._push(link, peer, rank, step, generation)
                if failure is None and failing:
                    log.info("replication to machine %d works again", peer)
                failing = failure is not None
                if failing:
                    time.sleep(_RETRY_S)
                    break
        if link is not None:
            link.close()

    def _push(self, link: PeerLink, peer: int, rank: int, step: int, generation: int) -> str | None:
        """Push one step; None when sent or skipped (a newer step is next), else why it failed."""
        ref = self._own.locate(rank, step)
        if ref is None:
            return None  # dropped or overwritten already: a newer step is next
        pacing = self.shaper.pacing(lambda: self._closed or self._generation != generation)
        result = link.push(self._own, ref, generation, self._corrupt(rank, step), pacing)
        if result.ok:
            with self._cond:
                self._sent[peer][rank] = max(step, self._sent[peer].get(rank, -1))
                self._cond.notify_all()
            if result.nbytes:
                self._events.emit(
                    events.REPLICATED,
                    generation=generation,
                    rank=rank,
                    step=step,
                    peer=peer,
                    nbytes=result.nbytes,
                    seconds=round(result.seconds, 6),
                    paced_s=round(result.paced_s, 6),
                )
            return None
        if result.status is PushStatus.SKIPPED:
            return None
        log.warning("replication to machine %d: %s", peer, result.describe())
        return result.describe()

    def partition(self, seconds: float) -> None:
        """The partition fault: no replication traffic to or from this machine for a while."""
        with self._cond:
            self._partitioned_until = time.monotonic() + seconds
        if self._server is not None:
            self._server.refuse_for(seconds)
        self._events.emit(events.PARTITIONED, seconds=seconds)

    # -- retrieval -----------------------------------------------------------------------------

    def fetch(self, rank: int, step: int, machine: int) -> float:
        """Install `rank`'s `step` from `machine`'s replica into this machine's memory.

        Raises:
            ReplicationError: the peer is unknown, unreachable or refuses.
            CorruptCheckpointError: a chunk fails verification (the peer drops that replica).
        """
        with self._cond:
            address = self._addresses.get(machine)
        if address is None or self._credentials is None:
            raise ReplicationError(
                f"rank {rank} step {step} is planned from machine {machine}, "
                "whose replication address is unknown"
            )
        try:
            result = fetch_replica(address, self._credentials, rank, step, into=self._own)
        except CorruptCheckpointError as e:
            self._events.emit(
                events.CORRUPT,
                generation=self._generation,
                rank=rank,
                step=step,
                detail=str(e),
                source=peer_source(machine),
                dropped=True,
            )
            raise
        self._events.emit(
            events.REPLICA_FETCHED,
            generation=self._generation,
            rank=rank,
            step=step,
            machine=machine,
            nbytes=result.nbytes,
            seconds=result.seconds,
            streams=result.streams,
        )
        return result.seconds
