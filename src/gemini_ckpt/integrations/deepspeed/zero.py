"""Where a DeepSpeed ZeRO engine keeps the state one rank owns, and the steps that change it.

ZeRO stages 1 and 2 (`DeepSpeedZeroOptimizer`) keep, per parameter group, this rank's partition of
the fp32 master weights (`single_partition_of_fp32_groups`); the module's weights are a full
bit16 copy on every rank, rebuilt from the partitions by the optimizer's own `update_lp_params()`
(the cast and all-gather its step ends with). Stage 3 (`DeepSpeedZeroOptimizer_Stage3`) keeps,
per sub-group, this rank's partition of the module itself (`fp16_partitioned_groups_flat`, which
the parameters' `ds_tensor`s view) and of the fp32 master weights (`fp32_partitioned_groups_flat`).
Either way the wrapped torch optimizer holds the moments, keyed by the fp32 partition tensors, and
changes them and the partitions only inside its `step()`; the ZeRO optimizer calls that step before
it writes the partitions it derives (bit16 copies, gathers). The flat partitions are padded to the
data-parallel alignment; they are captured as they are, padding included, so a restore into the
same topology is a plain copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gemini_ckpt.errors import RestoreError, SnapshotError

STAGE_1_2 = "DeepSpeedZeroOptimizer"
STAGE_3 = "DeepSpeedZeroOptimizer_Stage3"


@dataclass
class ZeroPartitions:
    """The partition tensors of one rank, found once on its engine."""

    stage: int
    fp32: list[torch.Tensor]
    """This rank's fp32 master-weight partitions, one per (sub-)group."""
    module: list[torch.Tensor] | None
    """ZeRO-3: this rank's partition of the module, one per sub-group; None for stages 1-2."""
    groups: list[list[torch.Tensor]]
    """The fp32 partitions each of the inner optimizer's param groups steps, in order."""
    inner: torch.optim.Optimizer
    """The torch optimizer that steps the partitions (and keeps the moments)."""
    extra_optimizers: list[torch.optim.Optimizer]
    """Other torch optimizers the ZeRO optimizer may step (stage 3 with partial offload)."""
    dp_rank: int
    dp_world: int


def find_partitions(engine: Any) -> ZeroPartitions:
    """This rank's ZeRO partitions on `engine` (a `DeepSpeedEngine` after `deepspeed.initialize`).

    Raises:
        SnapshotError: the engine is not a ZeRO 1-3 engine with a supported optimizer, or keeps a
            partition outside memory (NVMe parameter or optimizer offload).
    """
    zero = engine.optimizer
    name = type(zero).__name__
    stage = int(engine.zero_optimization_stage())
    if name not in (STAGE_1_2, STAGE_3) or stage not in (1, 2, 3):
        raise SnapshotError(
            f"DeepSpeedCheckpointer supports ZeRO stages 1-3 with DeepSpeed's ZeRO optimizers; "
            f"this engine has stage {stage} and optimizer {name} (bf16 with stage 0/1 uses "
            "BF16_Optimizer, which is not supported yet)"
        )
    inner = zero.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise SnapshotError(
            f"the ZeRO optimizer wraps {type(inner).__name__}, not a torch optimizer"
        )
    group = zero.dp_process_group
    dp_rank = torch.distributed.get_rank(group=group)
    dp_world = torch.distributed.get_world_size(group=group)
    if name == STAGE_1_2:
        fp32 = list(zero.single_partition_of_fp32_groups)
        return ZeroPartitions(stage, fp32, None, [[t] for t in fp32], inner, [], dp_rank, dp_world)
    if getattr(zero, "swap_optimizer", False) or any(
        t is None for t in zero.fp16_partitioned_groups_flat
    ):
        raise SnapshotError("ZeRO-3 with NVMe offload keeps partitions on disk; not supported")
    fp32 = list(zero.fp32_partitioned_groups_flat)
    groups: list[list[torch.Tensor]] = [[] for _ in inner.param_groups]
    for sub_group, tensor in enumerate(fp32):
        groups[zero.sub_group_to_group_id[sub_group]].append(tensor)
    backup = getattr(zero, "backup_optimizer", None)
    extra = [backup] if isinstance(backup, torch.optim.Optimizer) else []
    return ZeroPartitions(
        stage,
        fp32,
        list(zero.fp16_partitioned_groups_flat),
        groups,
        inner,
        extra,
        dp_rank,
        dp_world,
    )


def optimizer_state(parts: ZeroPartitions) -> dict[str, Any]:
    """The inner optimizer's state in `torch.optim.Optimizer.state_dict()` form, by reference.

    Param indices follow `parts.groups` (DeepSpeed's own ZeRO checkpoints number them the same
    way); the moments are the live tensors, not copies.
    """
    state: dict[int, dict[str, Any]] = {}
    param_groups = []
    index = 0
    for group, tensors in zip(parts.inner.param_groups, parts.groups, strict=True):
        ids = []
        for tensor in tensors:
            if tensor in parts.inner.state:
                state[index] = dict(parts.inner.state[tensor])
            ids.append(index)
            index += 1
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": param_groups}


def load_optimizer_state(parts: ZeroPartitions, saved: dict[str, Any]) -> None:
    """Put `optimizer_state` output back: moments copied into the live tensors (or created).

    Raises:
        RestoreError: the saved state has other groups, or tensors of other shapes.
    """
    if len(saved["param_groups"]) != len(parts.inner.param_groups):
        raise RestoreError(
            f"checkpoint has {len(saved['param_groups'])} optimizer param groups, this engine "
            f"{len(parts.inner.param_groups)}"
        )
    states = {int(k): v for k, v in saved["state"].items()}
    for group, saved_group, tensors in zip(
        parts.inner.param_groups, saved["param_groups"], parts.groups, strict=True
    ):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for index, tensor in zip(saved_group["params"], tensors, strict=True):
            if index in states:
                _load_param_state(parts.inner.state, tensor, states[index])


def _load_param_state(state: Any, param: torch.Tensor, saved: dict[str, Any]) -> None:
    live = state[param]  # a defaultdict(dict): created empty on a fresh optimizer
    for key, value in saved.items():
        current = live.get(key)
        if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
            if current.shape != value.shape or current.dtype != value.dtype:
                raise RestoreError(
                    f"optimizer state {key!r}: checkpoint {value.dtype}{list(value.shape)}, "
                    f"engine {current.dtype}{list(current.shape)}"
                )
            current.copy_(value)
        elif isinstance(value, torch.Tensor):
            device = param.device if value.dim() > 0 else value.device
            live[key] = value.to(device=device, copy=True)
        else:
            live[key] = value


def hooked_optimizers(parts: ZeroPartitions) -> Sequence[torch.optim.Optimizer]:
    """The torch optimizers whose `step()` is the first write to the partitions."""
    return [parts.inner, *parts.extra_optimizers]


def replay_cpu_adam_steps(parts: ZeroPartitions) -> None:
    """Bring DeepSpeedCPUAdam's C++ step state to where an uninterrupted run has it.

    The op keeps beta1^t and beta2^t and advances them by one multiplication per step; on a
    jump (a fresh optimizer asked for step t + 1) it recomputes them with pow(), which differs
    from the product in the last bits, so training after a restore would drift. Feeding it steps
    1..t over empty tensors repeats the multiplications and updates nothing.
    """
    op, opt_id = getattr(parts.inner, "ds_opt_adam", None), getattr(parts.inner, "opt_id", None)
    steps = {int(s["step"]) for s in parts.inner.state.values() if "step" in s}
    if op is None or opt_id is None or not steps:
        return
    if len(steps) != 1:
        raise RestoreError(f"DeepSpeedCPUAdam state holds different steps {sorted(steps)}")
    group = parts.inner.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for step in range(1, steps.pop() + 1):
        op.adam_update(
            opt_id,
            step,
            group["lr"],
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            group["bias_correction"],
            empty,
            empty,
            empty,
            empty,
        )
