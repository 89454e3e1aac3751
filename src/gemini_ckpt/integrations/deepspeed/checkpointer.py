"""`DeepSpeedCheckpointer`: the core API's three lines, for a `DeepSpeedEngine`.

    ckpt = DeepSpeedCheckpointer(engine, extra_state=loader)
    start = ckpt.restore()
    for step in range(start, total):
        loss = engine(batch); engine.backward(loss); engine.step()
        ckpt.save(step + 1)

Each rank snapshots only what it owns (`state.py`). `save()` references the partitions and moments
and copies them into the agent's memory in the background, like the core `Checkpointer`; a step
pre-hook on the ZeRO optimizer's inner torch optimizer waits for the copy. That hook is the first
thing of a ZeRO step to touch the partitions: before it, the step only computes gradient norms and
the loss scale, and forward and backward read the partitions (stage 3 gathers from them) or write
gradients into tensors of their own (`zero.py`).
"""

from __future__ import annotations

from typing import Any

from gemini_ckpt.config import TrainerConfig
from gemini_ckpt.integrations.deepspeed.state import DeepSpeedState
from gemini_ckpt.snapshot.checkpointer import StateCheckpointer
from gemini_ckpt.snapshot.state import Stateful


class DeepSpeedCheckpointer(StateCheckpointer):
    """Per-iteration in-memory checkpoints of one rank of a `DeepSpeedEngine` (ZeRO 1, 2, 3).

    Call `save(step)` after `engine.step()` at the end of a gradient-accumulation cycle.
    `restore()` is a collective under ZeRO (it re-gathers the module from the partitions), so
    every rank calls it, as every rank calls `deepspeed.initialize`. The engine's LR scheduler is
    included; `extra_state` is anything with `state_dict()`/`load_state_dict()` (a data position).

    Raises (at `start()`, `save()` or `restore()`):
        SnapshotError: the engine is not a supported ZeRO engine (see `zero.find_partitions`).
    """

    def __init__(
        self,
        engine: Any,
        *,
        extra_state: Stateful | None = None,
        config: TrainerConfig | None = None,
    ) -> None:
        self.state = DeepSpeedState(engine, extra_state)
        super().__init__(self.state, config=config)
