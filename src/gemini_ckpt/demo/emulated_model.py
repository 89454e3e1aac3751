"""The arithmetic of the emulated-accelerator workload: model shapes, scaling, buckets, durations.

Pure functions of the model's shape; `demo/emulated.py` runs what they describe.

Shapes are the paper's Table 2 (sequence 512, vocabulary 50265, micro-batch 8 per rank). A
transformer layer has the usual GPT-2 tensors: QKV (3h x h + 3h), attention output (h x h + h),
MLP up (ffn x h + ffn) and down (h x ffn + h), two layer norms (2h each); the embedding (token and
position, V x h + 512 x h) and the final layer norm form one more "layer" in front. By that count
`gpt2-20b`, `gpt2-40b` and `gpt2-100b` have 20.4 B, 40.7 B and 100.3 B parameters; `gpt2-10b`'s
printed shape (2560, 46 layers) has 3.75 B: Table 2 is used as printed.

Scaling: every tensor's element count is divided by `scale` (rounded up); the number of layers and
tensors, hence the number and order of collectives, is kept. The default scale per model brings
every model to 15-25 M parameters, so a 4-rank ZeRO-3 job moves ~4.5 bytes per parameter per rank
and iteration (two fp16 all-gathers and one fp16 reduce-scatter, each (N-1)/N of the bytes), about
0.7 s on a 1 gbit link, and checkpoints 12 / N bytes per parameter per rank (fp32 master weights
and Adam's two moments).

Compute: 8 x P x tokens FLOPs per iteration (forward 2, backward 4, activation recomputation 2),
P the scaled parameters, at `tflops` (default 1.0). That makes compute take about as long as the
training traffic at 1 gbit, so the network is idle about half of each iteration and a checkpoint
(3 bytes per parameter per rank on 4 ranks) fills about 75 % of that idle time: the proportion of
the paper's Fig 13 (checkpoint time 70-77 % of the idle time). `compute_s` overrides the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gemini_ckpt.errors import ConfigError

VOCAB = 50265
SEQ_LEN = 512
MICRO_BATCH = 8
TOKENS = SEQ_LEN * MICRO_BATCH
"""Tokens each rank processes per iteration (its micro-batch)."""
DDP_BUCKET_BYTES = 25 * 1024 * 1024
"""DDP's default bucket cap, applied to the full-scale gradient tensors before scaling."""
FLOPS_PER_PARAM_TOKEN = {"forward": 2.0, "backward": 6.0}
"""Backward includes the recomputed forward (activation recomputation, as in the paper)."""
GRAD_BYTES = 2
"""fp16 parameters and gradients on the wire (mixed precision)."""
STATE_BYTES = 12
"""fp32 master weight + Adam m + Adam v per parameter, in the checkpoint."""
PARALLELISMS = ("dp", "zero3")


@dataclass(frozen=True)
class ModelShape:
    """One row of the paper's Table 2, plus the scale that makes it fit one small host."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    default_scale: int


MODELS = {
    m.name: m
    for m in (
        ModelShape("gpt2-10b", 2560, 10240, 46, 40, 256),
        ModelShape("gpt2-20b", 5120, 20480, 64, 40, 1024),
        ModelShape("gpt2-40b", 5120, 20480, 128, 40, 2048),
        ModelShape("gpt2-100b", 8192, 32768, 124, 64, 4096),
    )
}


def layer_tensors(shape: ModelShape) -> list[int]:
    """Full-scale element counts of one transformer layer's tensors, in forward order."""
    h, f = shape.hidden, shape.ffn
    return [3 * h * h, 3 * h, h * h, h, f * h, f, h * f, h, 2 * h, 2 * h]


def embedding_tensors(shape: ModelShape) -> list[int]:
    """Full-scale element counts of the embedding "layer": token, position, final layer norm."""
    return [VOCAB * shape.hidden, SEQ_LEN * shape.hidden, 2 * shape.hidden]


def parameter_count(shape: ModelShape) -> int:
    """Full-scale parameters of the model."""
    return sum(embedding_tensors(shape)) + shape.layers * sum(layer_tensors(shape))


@dataclass(frozen=True)
class EmulationPlan:
    """What one rank of an emulated job computes and communicates each iteration.

    Attributes:
        shape: The model.
        parallel: "dp" (data parallel, DDP-style bucketed all-reduce) or "zero3".
        world: Ranks in the job.
        scale: Element counts are divided by this.
        tflops: Emulated accelerator throughput on the scaled model.
        compute_s: If > 0, the total compute per iteration, overriding the FLOPs formula.
    """

    shape: ModelShape
    parallel: str
    world: int
    scale: int
    tflops: float = 1.0
    compute_s: float = 0.0

    def __post_init__(self) -> None:
        if self.parallel not in PARALLELISMS:
            raise ConfigError(f"parallel must be one of {PARALLELISMS}, got {self.parallel!r}")
        if self.world < 1 or self.scale < 1:
            raise ConfigError(f"world and scale must be >= 1, got {self.world} and {self.scale}")
        if not math.isfinite(self.tflops) or self.tflops <= 0:
            raise ConfigError(f"tflops must be a finite number > 0, got {self.tflops}")
        if not math.isfinite(self.compute_s) or self.compute_s < 0:
            raise ConfigError(f"compute_s must be a finite number >= 0, got {self.compute_s}")

    def layers(self) -> list[list[int]]:
        """Scaled element counts per layer (the embedding first), each tensor at least 1."""
        full = [embedding_tensors(self.shape)] + [layer_tensors(self.shape)] * self.shape.layers
        return [[math.ceil(n / self.scale) for n in layer] for layer in full]

    def parameters(self) -> int:
        """Scaled parameters of the whole model."""
        return sum(sum(layer) for layer in self.layers())

    def padded_layer(self, layer: int) -> int:
        """A layer's elements rounded up to a multiple of `world` (ZeRO-3 partitions evenly)."""
        n = sum(self.layers()[layer])
        return -(-n // self.world) * self.world

    def state_elements(self) -> int:
        """Elements of each of this rank's fp32 master weights, Adam m and Adam v.

        ZeRO-3: its 1/N partition of every layer. DP: a 1/N share of the flat parameters
        (what a ZeRO-1 optimizer keeps per rank, and all a DDP job needs in its checkpoints:
        the full replica is the same on every rank).
        """
        if self.parallel == "zero3":
            return sum(self.padded_layer(i) // self.world for i in range(len(self.layers())))
        return dp_share(self.parameters(), self.world, 0)[1]

    def checkpoint_bytes(self) -> int:
        """Tensor bytes of one rank's checkpoint."""
        return STATE_BYTES * self.state_elements()

    def wire_bytes(self) -> float:
        """Bytes each rank sends per iteration for training (ring algorithms)."""
        share = (self.world - 1) / self.world
        if self.parallel == "zero3":  # two all-gathers and one reduce-scatter per layer
            return 3 * share * GRAD_BYTES * sum(map(self.padded_layer, range(len(self.layers()))))
        return 2 * share * GRAD_BYTES * self.parameters()  # ring all-reduce

    def layer_seconds(self, layer: int, phase: str) -> float:
        """Emulated compute of one layer's forward or backward (recomputation included)."""
        total_flops = sum(FLOPS_PER_PARAM_TOKEN.values()) * self.parameters() * TOKENS
        flops = FLOPS_PER_PARAM_TOKEN[phase] * sum(self.layers()[layer]) * TOKENS
        if self.compute_s > 0:
            return self.compute_s * flops / total_flops
        return flops / (self.tflops * 1e12)

    def compute_seconds(self) -> float:
        """Emulated compute of one iteration."""
        count = len(self.layers())
        return math.fsum(
            self.layer_seconds(i, phase) for i in range(count) for phase in FLOPS_PER_PARAM_TOKEN
        )

    def buckets(self) -> list[list[tuple[int, int]]]:
        """DDP's gradient buckets in the order backward fills them: lists of (layer, tensor).

        Tensors are taken in reverse (last layer's last tensor first) and a bucket is closed once
        it holds `DDP_BUCKET_BYTES` or more of full-scale fp16 gradients, as DDP assigns them.
        """
        full = [embedding_tensors(self.shape)] + [layer_tensors(self.shape)] * self.shape.layers
        out: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        size = 0
        for layer in reversed(range(len(full))):
            for tensor in reversed(range(len(full[layer]))):
                current.append((layer, tensor))
                size += full[layer][tensor] * GRAD_BYTES
                if size >= DDP_BUCKET_BYTES:
                    out.append(current)
                    current, size = [], 0
        if current:
            out.append(current)
        return out


def dp_share(total: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) of `rank`'s share of `total` elements: equal shares, the last one padded.

    Every rank gets ceil(total / world) elements so the checkpoints are the same size; the last
    rank's share runs past `total` and its tail is padding.
    """
    length = -(-total // world)
    return rank * length, length


def plan_for(model: str, parallel: str, world: int, **overrides: float) -> EmulationPlan:
    """The plan for a Table 2 model by name, with `scale`, `tflops`, `compute_s` or `layers`.

    `layers` keeps that many transformer layers, each of the model's own size.

    Raises:
        ConfigError: unknown model name or an invalid value.
    """
    shape = MODELS.get(model)
    if shape is None:
        raise ConfigError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    scale = int(overrides.get("scale") or shape.default_scale)
    layers = int(overrides.get("layers") or shape.layers)
    if not 1 <= layers <= shape.layers:
        raise ConfigError(f"layers must be in 1..{shape.layers} for {model}, got {layers}")
    shape = replace(shape, layers=layers)
    return EmulationPlan(
        shape,
        parallel,
        world,
        scale,
        tflops=float(overrides.get("tflops") or 1.0),
        compute_s=float(overrides.get("compute_s") or 0.0),
    )
