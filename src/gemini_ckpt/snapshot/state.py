"""What a rank's training state is made of, how it is captured at `save()` and loaded at restore.

The state is one tree: model, optimizers, LR scheduler, the user's extra state (data position, ...)
and RNG states. At capture, the parameters an optimizer updates and its state are only referenced:
they change solely inside `optimizer.step()`, which waits for the background copy. Everything else
(module buffers, which forward passes update in place, parameters no given optimizer owns, and the
small state) is cloned on the spot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gemini_ckpt.errors import RestoreError
from gemini_ckpt.snapshot.rng import capture_rng, restore_rng
from gemini_ckpt.snapshot.sharded import ShardLoader, contains_shards, local_shard, meshes_of
from gemini_ckpt.snapshot.tree import FlatState, flatten


class SnapshotSource(Protocol):
    """What a checkpointer captures and loads: a `TrainingState` or an integration's state.

    `capture` must only reference (not clone) tensors that change solely inside a `step()` of one
    of `hooked_optimizers()`: the checkpointer waits for the background copy in a step pre-hook
    of each of them. Everything else it must clone when `clone_unstable` is true.
    """

    def hooked_optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """The optimizers whose `step()` is the only place the referenced tensors change."""

    def capture(self, *, clone_unstable: bool) -> FlatState:
        """Snapshot the state tree, called at `save()`."""

    def load(self, tree: Any) -> None:
        """Load a tree produced by `capture` back, in place."""


class Stateful(Protocol):
    """Anything with `state_dict()` / `load_state_dict()` (a data position, a sampler, ...)."""

    def state_dict(self) -> Any:
        """Return the object's state as plain data and tensors."""

    def load_state_dict(self, state: Any) -> Any:
        """Restore the object from `state_dict()`'s output."""


@dataclass
class TrainingState:
    """The objects whose state is checkpointed together."""

    model: torch.nn.Module
    optimizers: Sequence[torch.optim.Optimizer]
    lr_scheduler: Stateful | None = None
    extra_state: Stateful | None = None

    def hooked_optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """The given optimizers: parameters and their state change only in their `step()`."""
        return self.optimizers

    def stable_storages(self) -> set[int]:
        """Storages that change only inside a hooked `optimizer.step()`.

        Those are the parameters the given optimizers update and their optimizer state. Any other
        parameter (frozen, updated by hand or in `forward`, as for an EMA) may change while the
        background copy runs, so it is not in this set and gets cloned at `save()`.
        """
        ptrs: set[int] = set()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                ptrs.update(_storage(p) for p in group["params"])
            for per_param in optimizer.state.values():
                values = per_param.values() if isinstance(per_param, dict) else [per_param]
                ptrs.update(_storage(v) for v in values if isinstance(v, torch.Tensor))
        return ptrs

    def capture(self, *, clone_unstable: bool) -> FlatState:
        """Snapshot the state tree; clone tensors outside `stable_storages()` if asked."""
        tree = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "extra_state": self.extra_state.state_dict() if self.extra_state else None,
            "rng": capture_rng(),
        }
        flat = flatten(tree)
        if clone_unstable:
            stable = self.stable_storages()
            flat.tensors = [
                t if t.untyped_storage().data_ptr() in stable else t.clone() for t in flat.tensors
            ]
        return flat

    def load(self, tree: Any) -> None:
        """Load a tree produced by `capture` into the objects, in place.

        Raises:
            RestoreError: the checkpoint does not match these objects (missing keys, wrong number
                of optimizers, a scheduler or extra state present on one side only).
        """
        if not isinstance(tree, dict) or set(tree) != {
            "model",
            "optimizers",
            "lr_scheduler",
            "extra_state",
            "rng",
        }:
            raise RestoreError("checkpoint does not hold a Gemini training state")
        if len(tree["optimizers"]) != len(self.optimizers):
            raise RestoreError(
                f"checkpoint has {len(tree['optimizers'])} optimizer states, this run has "
                f"{len(self.optimizers)} optimizers"
            )
        _check_presence("lr_scheduler", tree["lr_scheduler"], self.lr_scheduler)
        _check_presence("extra_state", tree["extra_state"], self.extra_state)
        if contains_shards(tree):
            self._load_shards(tree)
        try:
            self.model.load_state_dict(tree["model"], strict=True)
            for optimizer, state in zip(self.optimizers, tree["optimizers"], strict=False):
                optimizer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise RestoreError(f"checkpoint does not fit this model/optimizer: {e}") from e
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(tree["lr_scheduler"])
        if self.extra_state is not None:
            self.extra_state.load_state_dict(tree["extra_state"])
        restore_rng(tree["rng"])

    def _load_shards(self, tree: dict[str, Any]) -> None:
        """Replace the saved shards in `tree` by the running job's DTensors, loaded in place."""
        current = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        meshes = meshes_of(current, list(self.model.parameters()), params)
        ShardLoader(current, meshes).load(tree)


def _storage(tensor: torch.Tensor) -> int:
    # A DTensor has no storage of its own; its local shard's is what the copy reads.
    return local_shard(tensor).untyped_storage().data_ptr()


def _check_presence(name: str, saved: Any, current: Stateful | None) -> None:
    if (saved is None) != (current is None):
        side = "checkpoint" if saved is not None else "training script"
        raise RestoreError(f"{name} is present in the {side} only; pass the same objects as before")
