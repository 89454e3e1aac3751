"""A persisted step of a ZeRO-3 job in DeepSpeed's own checkpoint layout, for `load_checkpoint`.

DeepSpeed's `engine.save_checkpoint(OUT)` writes, for data-parallel rank r, `OUT/<tag>/
zero_pp_rank_<r>_mp_rank_00_model_states.pt` (the module with its partitioned parameters as
empty placeholders, its buffers, the LR scheduler, counters and metadata) and
`..._optim_states.pt` (the ZeRO optimizer's state: fp32 partitions, the inner optimizer's
`state_dict()`, the loss scaler), and `OUT/latest` naming the tag. A Gemini snapshot of a
ZeRO-3 rank holds exactly these values (`state.py` records the metadata), so each rank's files
are written from its persisted copy alone, without the model and without gathering; `engine.
load_checkpoint(OUT)` on the same topology then continues bit-identically. What DeepSpeed's
checkpoints do not hold (the user's extra state, the RNG streams, the micro-step counter) goes
into the client state under "gemini"; `load_exported_extras` puts it back.

Copies are read and verified as for the DCP export (`export/exporter.py`), written into a staging
directory and renamed to OUT at the end. ZeRO stages 1-2 put the whole module into one file,
which would need every rank's partition; they are refused for now.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from gemini_ckpt.config import default_copy_threads
from gemini_ckpt.errors import ExportError
from gemini_ckpt.export.exporter import check_out, publish, read_state, source_path
from gemini_ckpt.export.selection import ExportRequest, check_manifests, select
from gemini_ckpt.integrations.deepspeed.state import FORMAT, DeepSpeedState
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.rng import restore_rng
from gemini_ckpt.snapshot.state import Stateful
from gemini_ckpt.store.persistent import PersistentStore

log = logging.getLogger(__name__)

CLIENT_KEY = "gemini"
RECORD = "export.json"
_SCALERS = {"LossScaler": LossScaler, "DynamicLossScaler": DynamicLossScaler}


@dataclass(frozen=True)
class DeepSpeedExport:
    """What `export_deepspeed` wrote: OUT/latest and OUT/<tag>/ with two files per rank."""

    job: str
    step: int
    tag: str
    world_size: int
    reason: str
    out: Path


def rank_files(tree: Any, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ZeRO-3 rank's (model states, optimizer states), as DeepSpeed 0.19 saves them.

    Raises:
        ExportError: `tree` is not a ZeRO-3 rank's state captured by `DeepSpeedCheckpointer`.
    """
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise ExportError("the state was not saved by DeepSpeedCheckpointer")
    if tree["zero_stage"] != 3:
        raise ExportError(
            f"the job ran ZeRO stage {tree['zero_stage']}; exporting to DeepSpeed's layout "
            "supports stage 3 (stages 1-2 store the whole module in one file)"
        )
    meta, common = tree["deepspeed_layout"], tree["deepspeed_layout"]["common"]
    buffers = tree["buffers"]
    module = OrderedDict(
        (name, buffers[name] if name in buffers else torch.empty(0, dtype=getattr(torch, dtype)))
        for name, dtype in meta["module_keys"]
    )
    model_states = {
        "module": module,
        "optimizer": None,
        **common,
        "lr_scheduler": tree["lr_scheduler"],
        "data_sampler": None,
        "random_ltd": None,
        **tree["engine"],
        CLIENT_KEY: {
            "step": step,
            "extra_state": tree["extra_state"],
            "rng": tree["rng"],
            # DeepSpeed's own checkpoints leave the micro-step counter out.
            "micro_steps": tree["engine"]["micro_steps"],
        },
    }
    model_states.pop("micro_steps")
    scaler_class = _SCALERS[meta["loss_scaler_class"]]
    scaler = scaler_class.__new__(scaler_class)
    scaler.__dict__.update(tree["zero"]["loss_scaler"])
    zero_state = {
        "zero_stage": ZeroStageEnum.weights,
        "loss_scaler": scaler,
        "dynamic_loss_scale": meta["dynamic_loss_scale"],
        "overflow": tree["zero"]["overflow"],
        "partition_count": meta["partition_count"],
        "optimizer_state_dict": tree["optimizer"],
        "fp32_flat_groups": tree["fp32_partitions"],
    }
    optim_states = {
        "optimizer_state_dict": zero_state,
        "ds_config": common["ds_config"],
        "ds_version": common["ds_version"],
    }
    return model_states, optim_states


def load_exported_extras(
    client_state: dict[str, Any], extra_state: Stateful | None, engine: Any = None
) -> None:
    """After `engine.load_checkpoint` of an export: restore what DeepSpeed's files leave out.

    That is the extra state, the RNG streams and (given the `engine`) its micro-step counter.
    `client_state` is the second value `load_checkpoint` returns. Does nothing if it holds no
    Gemini extras (a checkpoint DeepSpeed wrote itself).
    """
    extras = client_state.get(CLIENT_KEY)
    if extras is None:
        return
    if engine is not None:
        engine.micro_steps = extras["micro_steps"]
    if extra_state is not None:
        extra_state.load_state_dict(extras["extra_state"])
    restore_rng(extras["rng"])
    DeepSpeedState.set_tracker_states(extras["rng"]["deepspeed"])


def export_deepspeed(request: ExportRequest) -> DeepSpeedExport:
    """Export one persisted step of a ZeRO-3 job to DeepSpeed's layout under `request.out`.

    Raises:
        ConfigError: `out` is not empty (without `force`) or overlaps the persistent tier.
        ExportError: the step or a rank is missing, the job is not ZeRO-3, or writing fails.
        StoreError: a persisted copy cannot be read.
        CorruptCheckpointError: a persisted copy fails verification.
    """
    if request.ranks is not None:
        raise ExportError("a DeepSpeed checkpoint needs every rank; --ranks does not apply")
    check_out(request)
    store = PersistentStore(request.persist_dir, request.job)
    chosen = select(store.inventory(), request.step, None)
    manifests = {rank: store.read_manifest(rank, chosen.step) for rank in chosen.ranks}
    world = check_manifests(manifests, request.job, whole_job=True)
    staging = request.out.parent / f".{request.out.name}.export-{secrets.token_hex(4)}"
    copier = ChunkCopier(default_copy_threads())
    try:
        tag = _write_ranks(store, request, chosen.step, chosen.ranks, staging, copier)
        result = DeepSpeedExport(request.job, chosen.step, tag, world, chosen.reason, request.out)
        try:
            (staging / "latest").write_text(tag)
            _write_record(result, staging / RECORD)
            # Ordering: OUT appears only once every rank's files and `latest` are in place.
            publish(staging, request.out, request.force)
        except OSError as e:
            raise ExportError(f"cannot write the export to {request.out}: {e}") from e
    finally:
        copier.close()
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported job %s step %d to %s (tag %s)", request.job, chosen.step, request.out, tag)
    return result


def _write_ranks(
    store: PersistentStore,
    request: ExportRequest,
    step: int,
    ranks: tuple[int, ...],
    staging: Path,
    copier: ChunkCopier,
) -> str:
    tag = ""
    for rank in ranks:
        _, tree = read_state(store, rank, step, copier, source_path(request, step, rank))
        try:
            model_states, optim_states = rank_files(tree, step)
        except ExportError as e:
            raise ExportError(f"rank {rank} step {step}: {e}") from e
        if tree["dp_rank"] != rank:
            raise ExportError(f"rank {rank} holds data-parallel rank {tree['dp_rank']}'s state")
        tag = tag or f"global_step{model_states['global_steps']}"
        folder = staging / tag
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"zero_pp_rank_{rank}_mp_rank_00"
        try:
            torch.save(model_states, folder / f"{prefix}_model_states.pt")
            torch.save(optim_states, folder / f"{prefix}_optim_states.pt")
        except OSError as e:
            raise ExportError(f"cannot write rank {rank}'s files under {folder}: {e}") from e
    # DeepSpeed puts its offline converter (ZeRO partitions -> fp32 state dict) beside them.
    script = Path(deepspeed.__file__).parent / "utils" / "zero_to_fp32.py"
    if script.is_file():
        shutil.copy(script, staging / "zero_to_fp32.py")
    return tag


def _write_record(result: DeepSpeedExport, path: Path) -> None:
    record = {
        "format": f"deepspeed {deepspeed.__version__} ZeRO-3 checkpoint",
        "job": result.job,
        "step": result.step,
        "tag": result.tag,
        "world_size": result.world_size,
        "reason": result.reason,
        "load": "engine.load_checkpoint(OUT) on the same world size and config; then "
        "gemini_ckpt.integrations.deepspeed.layout.load_exported_extras(client_state, extra, "
        "engine)",
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
