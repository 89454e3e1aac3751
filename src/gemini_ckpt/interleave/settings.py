"""How a machine interleaves checkpoint traffic: the link's cost model, the buffer, the profiler.

One value, built from the agent's command line and handed to the parts that use it: the trainer's
profiler (how many iterations, which gaps count, when to profile again) and the agent's sender
(the schedule's `TrafficConfig` once the checkpoint's size is known).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave.traffic import TrafficConfig


@dataclass(frozen=True)
class ProfileSettings:
    """What a trainer's profiler needs (`InterleaveSettings.profile()`), passed in one variable.

    Attributes:
        iterations: Iterations timed to derive the idle spans (after the warm-up), >= 1.
        warmup: Iterations skipped first (the first ones are slow), >= 0.
        min_span_s: Gaps between collectives no longer than this are not idle spans.
        drift: Profile again once the iteration time moved by more than this fraction.
    """

    iterations: int = 20
    warmup: int = 2
    min_span_s: float = 0.005
    drift: float = 0.2

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.warmup < 0:
            raise ConfigError(
                f"--profile-iterations must be >= 1 (got {self.iterations}) and the warm-up "
                f">= 0 (got {self.warmup})"
            )
        for name in ("min_span_s", "drift"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"profile {name} must be a finite number >= 0, got {value}")

    def to_env(self) -> str:
        """The value of the trainer's profile variable."""
        return f"{self.iterations},{self.warmup},{self.min_span_s!r},{self.drift!r}"

    @classmethod
    def from_env(cls, text: str) -> ProfileSettings:
        """Parse `to_env()`'s text.

        Raises:
            ConfigError: the text is not four comma-separated numbers in range.
        """
        parts = text.split(",")
        try:
            if len(parts) != 4:
                raise ValueError(f"{len(parts)} fields, expected 4")
            return cls(int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3]))
        except ValueError as e:
            raise ConfigError(f"profile settings {text!r} are not valid: {e}") from e


@dataclass(frozen=True)
class InterleaveSettings:
    """Interleaving of one job's checkpoint traffic into its training network's idle time.

    Attributes:
        bandwidth_bytes_per_s: B, what one machine's link carries per second each way.
        latency_s: alpha, the fixed cost of one transfer (a sub-buffer's round trip included).
        buffer_bytes: R, the bytes a receiver takes in before it must have stored them.
        sub_buffers: p, the pieces R is cut into; up to p chunks of R/p bytes are in flight at
            once, so storing one overlaps receiving the next. 1 turns the pipeline off: each
            chunk of R bytes is acknowledged before the next leaves.
        margin: mu, the fraction of each idle span that may be filled.
        profile_iterations: Iterations timed to derive the idle spans (after `warmup`).
        warmup_iterations: Iterations skipped before profiling (the first ones are slow).
        min_span_s: Gaps between collectives no longer than this are not idle spans.
        drift: Profile again once the iteration time moved by more than this fraction.
    """

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0005
    buffer_bytes: int = 32 << 20
    sub_buffers: int = 4
    margin: float = 0.8
    profile_iterations: int = 20
    warmup_iterations: int = 2
    min_span_s: float = 0.005
    drift: float = 0.2

    def __post_init__(self) -> None:
        if not math.isfinite(self.bandwidth_bytes_per_s) or self.bandwidth_bytes_per_s <= 0:
            raise ConfigError(
                "interleaving needs the link bandwidth (--link-bandwidth RATE, e.g. 1gbit), "
                f"got {self.bandwidth_bytes_per_s}"
            )
        if not (math.isfinite(self.margin) and 0 < self.margin <= 1):
            raise ConfigError(f"--interleave-margin must be in (0, 1], got {self.margin}")
        if self.sub_buffers < 1 or self.buffer_bytes < self.sub_buffers:
            raise ConfigError(
                f"--interleave-buffer {self.buffer_bytes} must hold --interleave-sub-buffers "
                f"{self.sub_buffers} (>= 1) pieces of at least one byte"
            )
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise ConfigError(f"--link-latency must be a finite number >= 0, got {self.latency_s}")
        self.profile()

    def profile(self) -> ProfileSettings:
        """The trainers' part."""
        return ProfileSettings(
            self.profile_iterations, self.warmup_iterations, self.min_span_s, self.drift
        )

    @property
    def chunk_bytes(self) -> int:
        """R/p: the largest chunk, one sub-buffer."""
        return self.buffer_bytes // self.sub_buffers

    def traffic(self, shard_bytes: int, remote_replicas: int) -> TrafficConfig:
        """The schedule's view of a checkpoint of `shard_bytes` sent to `remote_replicas` peers."""
        return TrafficConfig(
            shard_bytes=shard_bytes,
            remote_replicas=remote_replicas,
            buffer_bytes=self.buffer_bytes,
            sub_buffers=self.sub_buffers,
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
            latency_s=self.latency_s,
            margin=self.margin,
        )
