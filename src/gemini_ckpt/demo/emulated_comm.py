"""One emulated iteration's forward and backward: real collectives, compute as sleep.

`DataParallel` all-reduces DDP's gradient buckets while the emulated backward fills them;
`Zero3` all-gathers each layer's parameters before its forward and again before its backward
(prefetching one layer ahead, as DeepSpeed does) and reduce-scatters its gradients after.
Collectives are asynchronous (gloo runs them on its own threads), so they overlap the compute
sleeps as on an accelerator; `CollectiveLog` records when each one was issued and when it
completed, from which the bench derives the network's idle time.

Gradients are small integers times a per-step, per-rank factor, so fp16 sums are exact in any
order and a replayed or skipped step shows in the final state.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from gemini_ckpt.demo.emulated_model import EmulationPlan, dp_share

WIRE_DTYPE = torch.float16


class CollectiveLog:
    """(kind, issued, completed) of the collectives of the current iteration, monotonic seconds.

    Completion comes from the work's future where the backend has one (gloo's all-reduce and
    all-gather); gloo's reduce-scatter has none, so a named thread waits for those in issue
    order (a completion can then read late by as much as an earlier one finished after it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[list[Any]] = []
        self._waiting: queue.SimpleQueue[tuple[list[Any], Any] | None] = queue.SimpleQueue()
        self._waiter: threading.Thread | None = None

    def track(self, kind: str, work: Any) -> Any:
        """Record `work` (an async collective's handle) from now until it completes."""
        record: list[Any] = [kind, time.monotonic(), None]
        with self._lock:
            self._records.append(record)

        def done(_: Any) -> None:
            record[2] = time.monotonic()

        try:
            work.get_future().then(done)
        except RuntimeError:  # "Work::getFuture not implemented"
            self._start_waiter()
            self._waiting.put((record, work))
        return work

    def _start_waiter(self) -> None:
        if self._waiter is None:
            self._waiter = threading.Thread(
                target=self._wait_loop, name="emulated-collective-waiter", daemon=True
            )
            self._waiter.start()

    def _wait_loop(self) -> None:
        while (item := self._waiting.get()) is not None:
            record, work = item
            work.wait()
            record[2] = time.monotonic()

    def take(self) -> list[list[Any]]:
        """The records so far (call once every collective of the iteration was waited for)."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def close(self) -> None:
        """Stop the waiter thread (after the last collective)."""
        if self._waiter is not None:
            self._waiting.put(None)
            self._waiter.join(timeout=10)
            self._waiter = None


def pace(deadline: float) -> float:
    """Sleep until `deadline` (monotonic) if it is ahead; return the new time."""
    now = time.monotonic()
    if deadline > now:
        time.sleep(deadline - now)
        now = time.monotonic()
    return now


def gradient_factor(step: int, rank: int) -> int:
    """The small integer every gradient element of (step, rank) is scaled by."""
    return 1 + (step + rank) % 4


def base_pattern(numel: int) -> torch.Tensor:
    """Small integers in [-8, 8], fp16: exact in sums of a few ranks' multiples."""
    return (torch.arange(numel, dtype=torch.int64) % 17 - 8).to(WIRE_DTYPE)


def _collective(name: str) -> Any:
    # Looked up at each call, so the Checkpointer's profiler, which wraps these functions in
    # torch.distributed, sees them. torch 2.13 deprecates them for all_gather_single and
    # reduce_scatter_single, which the profiler does not wrap; the trainer silences the warning.
    return getattr(dist, name)


class DataParallel:
    """DDP-style: a full fp16 gradient per rank, all-reduced bucket by bucket during backward.

    The flat gradient is laid out in bucket order (last layer first); this rank's optimizer
    share is `dp_share` of it.
    """

    def __init__(self, plan: EmulationPlan, rank: int, log: CollectiveLog) -> None:
        self.plan, self.rank, self.log = plan, rank, log
        layers = plan.layers()
        self.buckets = [sum(layers[la][t] for la, t in b) for b in plan.buckets()]
        self.seconds = [
            sum(plan.layer_seconds(la, "backward") * layers[la][t] / sum(layers[la]) for la, t in b)
            for b in plan.buckets()
        ]
        offset, length = dp_share(plan.parameters(), plan.world, rank)
        self.grad = torch.zeros(max(plan.parameters(), offset + length), dtype=WIRE_DTYPE)
        self.base = base_pattern(plan.parameters())
        self.share = (offset, length)

    def run(self, step: int, out: torch.Tensor) -> None:
        """Forward, backward with bucketed all-reduce; this rank's share of the sum into `out`."""
        forward = sum(self.plan.layer_seconds(i, "forward") for i in range(len(self.plan.layers())))
        now = pace(time.monotonic() + forward)
        factor = gradient_factor(step, self.rank)
        works, cursor = [], 0
        for size, seconds in zip(self.buckets, self.seconds, strict=True):
            deadline = now + seconds
            bucket = self.grad[cursor : cursor + size]
            torch.mul(self.base[cursor : cursor + size], factor, out=bucket)
            now = pace(deadline)
            works.append(self.log.track("all_reduce", dist.all_reduce(bucket, async_op=True)))
            cursor += size
        for work in works:
            work.wait()
        offset, length = self.share
        out.copy_(self.grad[offset : offset + length])


class Zero3:
    """ZeRO-3: each rank keeps 1/N of every layer; layers are gathered when used."""

    def __init__(self, plan: EmulationPlan, rank: int, log: CollectiveLog) -> None:
        self.plan, self.rank, self.log = plan, rank, log
        self.count = len(plan.layers())
        self.sizes = [plan.padded_layer(i) for i in range(self.count)]
        self.shards = [n // plan.world for n in self.sizes]
        self.offsets = [sum(self.shards[:i]) for i in range(self.count)]
        self.params16 = torch.zeros(sum(self.shards), dtype=WIRE_DTYPE)
        self.grad16 = torch.zeros(sum(self.shards), dtype=WIRE_DTYPE)
        self.gathered = [torch.empty(n, dtype=WIRE_DTYPE) for n in self.sizes]
        self.full_grad = [torch.empty(n, dtype=WIRE_DTYPE) for n in self.sizes]
        self.base = [base_pattern(n) for n in self.sizes]

    def shard(self, flat: torch.Tensor, layer: int) -> torch.Tensor:
        """`layer`'s slice of a flat per-rank tensor laid out like the master weights."""
        return flat[self.offsets[layer] : self.offsets[layer] + self.shards[layer]]

    def _gather(self, layer: int) -> Any:
        gather = _collective("all_gather_into_tensor")
        work = gather(self.gathered[layer], self.shard(self.params16, layer), async_op=True)
        return self.log.track("all_gather", work)

    def run(self, step: int, master: torch.Tensor, out: torch.Tensor) -> None:
        """Forward and backward of every layer; this rank's reduced gradient shard into `out`."""
        self.params16.copy_(master)  # the fp16 working copy of the updated master weights
        plan = self.plan
        pending = self._gather(0)
        for layer in range(self.count):
            pending.wait()
            pending = self._gather(layer + 1 if layer + 1 < self.count else self.count - 1)
            pace(time.monotonic() + plan.layer_seconds(layer, "forward"))
        factor = gradient_factor(step, self.rank)
        scatter = _collective("reduce_scatter_tensor")
        reductions = []
        for layer in reversed(range(self.count)):
            pending.wait()  # this layer's parameters, gathered again for the backward
            if layer > 0:
                pending = self._gather(layer - 1)
            deadline = time.monotonic() + plan.layer_seconds(layer, "backward")
            torch.mul(self.base[layer], factor, out=self.full_grad[layer])
            pace(deadline)
            work = scatter(self.shard(self.grad16, layer), self.full_grad[layer], async_op=True)
            reductions.append(self.log.track("reduce_scatter", work))
        for work in reductions:
            work.wait()
        out.copy_(self.grad16)
