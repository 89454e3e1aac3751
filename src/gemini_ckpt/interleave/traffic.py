"""The values the traffic schedule works with: what to send, over which link, and the chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave.profile import IdleSpan

# Every chunk becomes an entry in the schedule and a transfer; a checkpoint cut into more pieces
# than this means a sub-buffer far too small for the shard (R/p of a few bytes), not a real plan.
MAX_CHUNKS = 1_000_000


@dataclass(frozen=True)
class TrafficConfig:
    """One machine's checkpoint traffic per iteration and the link that carries it.

    Attributes:
        shard_bytes: The machine's checkpoint shard, >= 0.
        remote_replicas: m - 1, the copies sent to peers (the local copy uses no network), >= 0.
        buffer_bytes: R, the GPU memory reserved for checkpoint traffic (the paper: 128 MB).
        sub_buffers: p, the pieces R is split into so receiving one chunk overlaps copying the
            previous one to host memory (the paper: 4 x 32 MB). Chunks are at most R // p bytes.
        bandwidth_bytes_per_s: B, the link bandwidth, > 0.
        latency_s: alpha, the start-up cost of one transfer, >= 0.
        margin: mu, the fraction of every idle span that may be used, in (0, 1]; the rest absorbs
            the spans' variation between iterations.
    """

    shard_bytes: int
    remote_replicas: int
    buffer_bytes: int
    sub_buffers: int
    bandwidth_bytes_per_s: float
    latency_s: float
    margin: float

    def __post_init__(self) -> None:
        _require_int("shard_bytes", self.shard_bytes, minimum=0)
        _require_int("remote_replicas", self.remote_replicas, minimum=0)
        _require_int("sub_buffers", self.sub_buffers, minimum=1)
        _require_int("buffer_bytes", self.buffer_bytes, minimum=1)
        if self.buffer_bytes < self.sub_buffers:
            raise ConfigError(
                f"buffer_bytes={self.buffer_bytes} is smaller than sub_buffers={self.sub_buffers}: "
                "every sub-buffer must hold at least one byte"
            )
        bandwidth = self.bandwidth_bytes_per_s
        if not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ConfigError(f"bandwidth_bytes_per_s must be finite and > 0, got {bandwidth}")
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise ConfigError(f"latency_s must be finite and >= 0, got {self.latency_s}")
        if not (math.isfinite(self.margin) and 0 < self.margin <= 1):
            raise ConfigError(
                f"margin must be a fraction of each idle span in (0, 1], got {self.margin}"
            )
        chunks = self.remote_replicas * math.ceil(self.shard_bytes / self.chunk_bytes)
        if chunks > MAX_CHUNKS:
            raise ConfigError(
                f"buffer_bytes={self.buffer_bytes} / sub_buffers={self.sub_buffers} gives chunks "
                f"of {self.chunk_bytes} bytes, cutting {self.total_bytes} bytes into {chunks} "
                f"chunks (at most {MAX_CHUNKS})"
            )

    @property
    def chunk_bytes(self) -> int:
        """The largest chunk, one sub-buffer: floor(R / p) bytes."""
        return self.buffer_bytes // self.sub_buffers

    @property
    def total_bytes(self) -> int:
        """Bytes sent per checkpoint: shard_bytes x remote_replicas."""
        return self.shard_bytes * self.remote_replicas

    def cost(self, size: int) -> float:
        """f(s) = alpha + s/B: seconds the link is busy sending one chunk of `size` bytes."""
        return self.latency_s + size / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Chunk:
    """A piece of one remote copy, sent in one transfer through one sub-buffer.

    Attributes:
        replica: Which remote copy, 0..m-2 (each goes to a different peer).
        offset: Byte offset of the piece within the shard.
        size: Bytes, 1..R/p.
        send_at: Seconds from the iteration's start at which the transfer starts under the cost
            model (the previous chunk of the span has just finished).
        overflow: True when the chunk does not fit the idle time and delays the update; only the
            last span of a schedule has such chunks.
    """

    replica: int
    offset: int
    size: int
    send_at: float
    overflow: bool = False


@dataclass(frozen=True)
class SpanPlan:
    """The chunks to send during one idle span.

    Attributes:
        iteration: Which iteration of the schedule (0 unless spread over several).
        index: Position of the span within its iteration.
        span: The idle span.
        usable_seconds: mu x the span's length: the time its fitting chunks may use.
        chunks: Chunks in sending order; the fitting ones, then (last span only) any overflow.
    """

    iteration: int
    index: int
    span: IdleSpan
    usable_seconds: float
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Cursor:
    """The next byte to schedule: `offset` within remote copy `replica`."""

    replica: int
    offset: int

    def done(self, traffic: TrafficConfig) -> bool:
        """Whether every byte of every remote copy has been scheduled."""
        return traffic.shard_bytes == 0 or self.replica >= traffic.remote_replicas

    def advance(self, size: int, traffic: TrafficConfig) -> Cursor:
        """The cursor after `size` more bytes; a chunk never crosses into the next copy."""
        offset = self.offset + size
        if offset >= traffic.shard_bytes:
            return Cursor(self.replica + 1, 0)
        return Cursor(self.replica, offset)


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
