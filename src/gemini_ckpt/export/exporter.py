"""One persisted step as torch.distributed.checkpoint (DCP) directories, for standard tools.

Each rank's copy in the persistent tier is that rank's whole training state, so each becomes its
own single-process DCP checkpoint, `OUT/rank-<r>/` (docs/decisions/0006-export-to-dcp.md). A copy
is read the way a restore reads it: manifest, data, every chunk checked against its checksum, then
the state rebuilt from the JSON skeleton, so nothing is unpickled. `OUT/export.json` records what
was exported. Everything is written into a staging directory beside OUT and renamed at the end: a
failed export leaves nothing under OUT's name. The persistent tier is only read (a corrupt copy is
reported, not set aside as a restore would).

Only `PersistentStore`'s constructor, `inventory`, `read_manifest` and `read_into` are used, so the
store may change where and how it keeps its files.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gemini_ckpt import __version__
from gemini_ckpt.config import default_copy_threads
from gemini_ckpt.errors import ConfigError, CorruptCheckpointError, ExportError
from gemini_ckpt.export.dcp_format import FORMAT, NOTES, values_under_non_string_keys, write_dcp
from gemini_ckpt.export.selection import ExportRequest, check_manifests, select
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.snapshot.reader import verified_tensors
from gemini_ckpt.snapshot.tree import unflatten
from gemini_ckpt.store.persistent import PersistentStore
from gemini_ckpt.store.shm import MappedRegion

log = logging.getLogger(__name__)

RECORD = "export.json"


@dataclass(frozen=True)
class RankExport:
    """One rank's exported checkpoint, as recorded in export.json."""

    rank: int
    path: str
    """The DCP directory, relative to OUT."""
    source: str
    generation: int
    chunks_verified: int
    tensors: int
    values: int
    """DCP object (non-tensor) entries."""
    top_level_keys: list[str]
    values_under_non_string_keys: list[str]


@dataclass(frozen=True)
class ExportResult:
    """What `export_step` wrote under `out`."""

    job: str
    step: int
    world_size: int
    reason: str
    out: Path
    ranks: list[RankExport]


def source_path(request: ExportRequest, step: int, rank: int) -> str:
    """Where a rank's data file lies, for the record: the persistent tier's documented layout."""
    location = str(request.persist_dir).rstrip("/")
    return f"{location}/{request.job}/step-{step:012d}/rank-{rank}.safetensors"


def _buffer(nbytes: int, source: str) -> MappedRegion:
    """Anonymous memory shaped as the region a restore verifies (`verified_tensors` reads it)."""
    mm = mmap.mmap(-1, max(nbytes, 1))
    empty = torch.empty(0, dtype=torch.uint8)
    return MappedRegion(
        Path(source), nbytes, mm, torch.frombuffer(mm, dtype=torch.uint8) if nbytes else empty
    )


def read_state(
    store: PersistentStore, rank: int, step: int, copier: ChunkCopier, source: str
) -> tuple[Manifest, Any]:
    """`rank`'s persisted state of `step`, every chunk verified, rebuilt from its skeleton.

    Raises:
        StoreError: there is no such copy or it cannot be read.
        CorruptCheckpointError: the copy is truncated, fails a checksum or its skeleton is bad.
    """
    manifest = store.read_manifest(rank, step)
    region = _buffer(manifest.data_nbytes, source)
    try:
        with region.view() as view:
            manifest = store.read_into(rank, step, view)
        tensors = verified_tensors(copier, manifest, region, source)
    finally:
        region.close()
    try:
        return manifest, unflatten(manifest.skeleton, [tensors[i] for i in manifest.tensor_refs])
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"rank {rank} step {step} from {source}: {e}") from e


def _export_rank(
    store: PersistentStore, request: ExportRequest, step: int, rank: int, staging: Path
) -> RankExport:
    source = source_path(request, step, rank)
    copier = ChunkCopier(default_copy_threads())
    try:
        manifest, state = read_state(store, rank, step, copier, source)
    finally:
        copier.close()
    if not isinstance(state, dict):
        raise ExportError(
            f"rank {rank} step {step}: the state is a {type(state).__name__}, not a dict of named "
            "entries that DCP can save"
        )
    try:
        tensors, values = write_dcp(state, staging / f"rank-{rank}")
    except ExportError as e:
        raise ExportError(f"rank {rank} step {step}: {e}") from e
    return RankExport(
        rank=rank,
        path=f"rank-{rank}",
        source=source,
        generation=manifest.generation,
        chunks_verified=manifest.num_chunks,
        tensors=tensors,
        values=values,
        top_level_keys=[str(key) for key in state],
        values_under_non_string_keys=list(values_under_non_string_keys(state)),
    )


def check_out(request: ExportRequest) -> None:
    """Refuse an `out` that would lose data: a non-empty one without `force`, or the source.

    Raises:
        ConfigError: `out` is not a directory, is not empty (without `force`), or overlaps the
            job's persistent directory (when that is a directory, not a URL).
    """
    out = request.out.resolve()
    if isinstance(request.persist_dir, Path):
        source = (request.persist_dir / request.job).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise ConfigError(
                f"the export directory {request.out} overlaps the persisted job {source}"
            )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the export directory {request.out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not request.force:
        raise ConfigError(f"the export directory {request.out} is not empty; --force replaces it")


def publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished export to `out`: a whole export under that name or none at all."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        if not force:
            raise ConfigError(f"the export directory {out} is not empty; --force replaces it")
        old = out.with_name(f".{out.name}.replaced-{secrets.token_hex(4)}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(staging, out)


def _write_record(result: ExportResult, request: ExportRequest, path: Path) -> None:
    record = {
        "format": FORMAT,
        "exported_by": f"gemini-ckpt {__version__} (torch {torch.__version__})",
        "job": result.job,
        "step": result.step,
        "world_size": result.world_size,
        "reason": result.reason,
        "persist_dir": str(request.persist_dir),
        "ranks": [asdict(r) for r in result.ranks],
        "notes": list(NOTES),
    }
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def export_step(request: ExportRequest) -> ExportResult:
    """Export one persisted step of `request.job` to DCP under `request.out` (see the module).

    Raises:
        ConfigError: `out` is not empty (without `force`) or overlaps the persistent tier.
        ExportError: the step or a rank is missing, or the export cannot be written.
        StoreError: a persisted copy cannot be read.
        CorruptCheckpointError: a persisted copy fails verification.
    """
    check_out(request)
    store = PersistentStore(request.persist_dir, request.job)
    try:
        chosen = select(store.inventory(), request.step, request.ranks)
    except ExportError as e:
        raise ExportError(f"job {request.job!r} in {request.persist_dir}: {e}") from None
    log.info("exporting job %s: %s", request.job, chosen.reason)
    manifests = {rank: store.read_manifest(rank, chosen.step) for rank in chosen.ranks}
    world = check_manifests(manifests, request.job, whole_job=request.ranks is None)
    staging = request.out.parent / f".{request.out.name}.export-{secrets.token_hex(4)}"
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise ExportError(f"cannot create {staging}: {e}") from e
        ranks = [_export_rank(store, request, chosen.step, r, staging) for r in chosen.ranks]
        result = ExportResult(request.job, chosen.step, world, chosen.reason, request.out, ranks)
        try:
            _write_record(result, request, staging / RECORD)
            # Ordering: OUT appears only once every rank's DCP files (fsynced by DCP) and the
            # record are in place.
            publish(staging, request.out, request.force)
        except OSError as e:
            raise ExportError(f"cannot write the export to {request.out}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
