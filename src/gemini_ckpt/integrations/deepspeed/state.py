"""The training state of one DeepSpeed rank: what `DeepSpeedCheckpointer` captures and loads.

One tree per rank: this rank's ZeRO partitions (`zero.py`) and the inner optimizer's moments, by
reference; the loss scaler, the engine's counters, the module's buffers, the LR scheduler, the
user's extra state and every RNG stream (torch, Python, NumPy, DeepSpeed's model-parallel
tracker), captured on the spot. Nothing is gathered: a rank's snapshot is its partition plus a
few kilobytes. Under ZeRO-3 the tree also carries, once per snapshot, the metadata DeepSpeed
writes next to its own checkpoints (parameter shapes, config, version), so a persisted step can
be exported to DeepSpeed's layout without the model (`layout.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gemini_ckpt.errors import RestoreError, SnapshotError
from gemini_ckpt.integrations.deepspeed import zero
from gemini_ckpt.snapshot.rng import capture_rng, restore_rng
from gemini_ckpt.snapshot.state import Stateful
from gemini_ckpt.snapshot.tree import FlatState, flatten

FORMAT = "gemini-deepspeed/1"
COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_PLAIN = (bool, int, float, str, type(None), torch.dtype)
# `_common_checkpoint_state` keys that change every step or are written per rank at export.
_PER_STEP_KEYS = (
    "module",
    "optimizer",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    *COUNTERS,
)


class DeepSpeedState:
    """The state of one rank of a `DeepSpeedEngine` (ZeRO 1-3), as a `SnapshotSource`."""

    def __init__(self, engine: Any, extra_state: Stateful | None = None) -> None:
        self.engine = engine
        self.extra_state = extra_state
        self._parts: zero.ZeroPartitions | None = None
        self._layout_meta: dict[str, Any] | None = None

    @property
    def parts(self) -> zero.ZeroPartitions:
        """This rank's partitions (found on first use, after `deepspeed.initialize`)."""
        if self._parts is None:
            self._parts = zero.find_partitions(self.engine)
        return self._parts

    def hooked_optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """The inner torch optimizer(s): their `step()` is the first write to the partitions."""
        return zero.hooked_optimizers(self.parts)

    def partition_nbytes(self) -> int:
        """Bytes of this rank's partitions and moments (what a snapshot holds besides metadata)."""
        unique = {t.untyped_storage().data_ptr(): t for t in self._stable_tensors()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    # -- capture ---------------------------------------------------------------------------------

    def tree(self) -> dict[str, Any]:
        """The state tree, partitions and moments by reference (no copy)."""
        engine, parts = self.engine, self.parts
        gas = int(engine.gradient_accumulation_steps())
        if engine.micro_steps % gas:
            raise SnapshotError(
                f"save() inside a gradient accumulation cycle (micro step {engine.micro_steps}, "
                f"{gas} per step): call it after the engine.step() that ends a cycle"
            )
        scheduler = engine.lr_scheduler
        return {
            "format": FORMAT,
            "zero_stage": parts.stage,
            "dp_rank": parts.dp_rank,
            "dp_world": parts.dp_world,
            "fp32_partitions": parts.fp32,
            "module_partitions": parts.module,
            "optimizer": zero.optimizer_state(parts),
            "zero": {
                "loss_scaler": _loss_scaler_state(engine.optimizer.loss_scaler),
                "overflow": bool(engine.optimizer.overflow),
            },
            "engine": {name: int(getattr(engine, name)) for name in COUNTERS},
            "buffers": dict(_persistent_buffers(engine.module)),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra_state": self.extra_state.state_dict() if self.extra_state else None,
            "rng": {**capture_rng(), "deepspeed": _tracker().get_states()},
            "deepspeed_layout": self._layout() if parts.stage == 3 else None,
        }

    def capture(self, *, clone_unstable: bool) -> FlatState:
        """Snapshot the tree; clone everything but the partitions and moments if asked."""
        flat = flatten(self.tree())
        if clone_unstable:
            stable = {t.untyped_storage().data_ptr() for t in self._stable_tensors()}
            flat.tensors = [
                t if t.untyped_storage().data_ptr() in stable else t.clone() for t in flat.tensors
            ]
        return flat

    def _stable_tensors(self) -> list[torch.Tensor]:
        """The partitions and moments: written only inside the hooked optimizers' steps."""
        parts = self.parts
        tensors = [*parts.fp32, *(parts.module or [])]
        for per_param in parts.inner.state.values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return tensors

    def _layout(self) -> dict[str, Any]:
        """What DeepSpeed's own ZeRO-3 checkpoint files hold besides the state (static; cached)."""
        if self._layout_meta is None:
            engine = self.engine
            frozen = bool(engine.zero_optimization_partition_gradients())
            common = engine._common_checkpoint_state(None, True, frozen)
            self._layout_meta = {
                "common": {k: v for k, v in common.items() if k not in _PER_STEP_KEYS},
                "module_keys": [
                    [name, str(t.dtype).removeprefix("torch.")]
                    for name, t in engine.module.state_dict().items()
                ],
                "partition_count": engine.optimizer.partition_count,
                "dynamic_loss_scale": bool(engine.optimizer.dynamic_loss_scale),
                "loss_scaler_class": type(engine.optimizer.loss_scaler).__name__,
            }
        return self._layout_meta

    # -- load ------------------------------------------------------------------------------------

    def load(self, tree: Any) -> None:
        """Load a captured tree into the engine, in place (a collective under ZeRO 1-2 and 3).

        Raises:
            RestoreError: the checkpoint is not a DeepSpeed rank's state of this topology.
        """
        parts = self.parts
        _check_topology(tree, parts)
        zero_opt = self.engine.optimizer
        if parts.stage == 3:
            zero_opt.checkpoint_event_prologue()  # release gathered parameters, as DeepSpeed does
        _copy_all("fp32 partition", parts.fp32, tree["fp32_partitions"])
        if parts.module is not None:
            _copy_all("module partition", parts.module, tree["module_partitions"])
        zero.load_optimizer_state(parts, tree["optimizer"])
        zero.replay_cpu_adam_steps(parts)  # optimizer offload: the op's own step state
        _load_loss_scaler(zero_opt.loss_scaler, tree["zero"]["loss_scaler"])
        zero_opt.overflow = tree["zero"]["overflow"]
        for name, value in tree["engine"].items():
            setattr(self.engine, name, value)
        live_buffers = dict(_persistent_buffers(self.engine.module))
        for name, value in tree["buffers"].items():
            _copy_all(f"buffer {name}", [live_buffers[name]], [value])
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.load_state_dict(tree["lr_scheduler"])
        if self.extra_state is not None:
            self.extra_state.load_state_dict(tree["extra_state"])
        # The module's weights follow from the partitions, as after an optimizer step: stages
        # 1-2 cast and all-gather the bit16 copy, stage 3 re-gathers its persistent parameters.
        if parts.stage == 3:
            zero_opt.checkpoint_event_epilogue()
        else:
            zero_opt.update_lp_params()
        restore_rng(tree["rng"])
        self.set_tracker_states(tree["rng"]["deepspeed"])

    @staticmethod
    def set_tracker_states(states: dict[str, Any]) -> None:
        """Restore DeepSpeed's model-parallel RNG tracker (activation checkpointing's streams)."""
        _tracker().set_states(dict(states))


def _check_topology(tree: Any, parts: zero.ZeroPartitions) -> None:
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise RestoreError(
            "checkpoint does not hold a DeepSpeed rank's state (saved by another API)"
        )
    saved = (tree["zero_stage"], tree["dp_rank"], tree["dp_world"])
    here = (parts.stage, parts.dp_rank, parts.dp_world)
    if saved != here:
        raise RestoreError(
            f"checkpoint is ZeRO stage {saved[0]}, data-parallel rank {saved[1]} of {saved[2]}; "
            f"this engine is stage {here[0]}, rank {here[1]} of {here[2]}"
        )


def _copy_all(what: str, live: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    if len(live) != len(saved):
        raise RestoreError(f"checkpoint has {len(saved)} {what}s, this engine {len(live)}")
    for i, (dst, src) in enumerate(zip(live, saved, strict=True)):
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise RestoreError(
                f"{what} {i}: checkpoint {src.dtype}{list(src.shape)}, "
                f"engine {dst.dtype}{list(dst.shape)} (same model, config and world size needed)"
            )
        dst.data.copy_(src)


def _persistent_buffers(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, Any]]:
    """The buffers `state_dict()` holds, by name, as DeepSpeed saves them (`buffer_names`)."""
    found = [
        (prefix + name, buf)
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and name not in module._non_persistent_buffers_set
    ]
    for name, child in module.named_children():
        found += _persistent_buffers(child, f"{prefix}{name}.")
    return found


def _loss_scaler_state(scaler: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (*_PLAIN, torch.Tensor))}


def _load_loss_scaler(scaler: Any, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        current = getattr(scaler, key, None)
        if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
            current.copy_(value)
        else:
            setattr(scaler, key, value)


def _tracker() -> Any:
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()
