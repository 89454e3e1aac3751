"""bench_snapshot's FSDP2 case: two ranks on gloo, each checkpointing its shards of one state.

A model + AdamW state of `nbytes` in total is sharded with `fully_shard` over 2 ranks (spawned
processes, real gloo); each rank times its saves through its own in-process agent exactly as the
plain case does, against a plain copy of its own shards. It also reports how many bytes the
committed checkpoint holds for the model and optimizer: the rank's partition, nothing gathered.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import bench_snapshot as bench
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.protocol.manifest import Manifest
from gemini_ckpt.snapshot.sharded import local_shard

RANKS = 2


def make_sharded_state(nbytes: int, tensors: int = 8) -> tuple[torch.nn.Module, Any]:
    """`bench.make_state`'s model, sharded over all ranks, after one AdamW step."""
    per_tensor = max(RANKS, nbytes // (3 * 4 * tensors))
    torch.manual_seed(0)
    model = torch.nn.ParameterList(
        torch.nn.Parameter(torch.randn(per_tensor)) for _ in range(tensors)
    )
    fully_shard(model, mesh=init_device_mesh("cpu", (RANKS,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model:
        p.grad = torch.ones_like(p)  # a DTensor of the parameter's sharding
    optimizer.step()
    return model, optimizer


def stored_bytes(manifest: Manifest, top_keys: tuple[str, ...]) -> int:
    """Bytes the checkpoint holds for the tensors under `top_keys` of the state."""
    found: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for tag in ("__tensor__", "__dtensor__"):
                if tag in node:
                    found.append(node[tag] if tag == "__tensor__" else node[tag][0])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for key, value in manifest.skeleton["__dict__"]:
        if key in top_keys:
            walk(value)
    return sum(manifest.entries[manifest.tensor_refs[i]].nbytes for i in set(found))


def _rank(rank: int, init_file: str, nbytes: int, args: argparse.Namespace, out: Any) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        state = make_sharded_state(nbytes)
        full = bench.state_tensors(*state)
        local = [local_shard(t) for t in full]
        partition = sum(t.numel() * t.element_size() for t in local)
        with EmbeddedAgent(world_size=3, memory_limit=7 * partition + (64 << 20)) as agent:
            samples, _ = bench.time_saves(agent, state, bench.PlainCopy(local), args)
            ref = agent.store.locate(0, args.repeats + 2)  # the sync saver's last step
            manifest = ref.manifest if ref else None
        out.put(
            {
                "rank": rank,
                "partition_bytes": partition,
                "full_bytes": sum(t.numel() * t.element_size() for t in full),
                "snapshot_bytes": sum(e.nbytes for e in manifest.entries) if manifest else 0,
                "snapshot_model_optimizer_bytes": (
                    stored_bytes(manifest, ("model", "optimizers")) if manifest else 0
                ),
                "samples": samples,
            }
        )
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - handed to the parent, which raises it
        out.put({"rank": rank, "error": traceback.format_exc()})


def run_fsdp2(nbytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the FSDP2 case for a state of `nbytes` in total."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-fsdp2-") as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, f"{tmp}/init", nbytes, args, out), daemon=True)
            for r in range(RANKS)
        ]
        for p in procs:
            p.start()
        reports = sorted((out.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join(60)
    for report in reports:
        if "error" in report:
            raise RuntimeError(f"FSDP2 rank {report['rank']} failed:\n{report['error']}")
    return {"bytes": reports[0]["full_bytes"], "ranks": [_summary(r) for r in reports]}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    samples = report.pop("samples")
    ratios = {
        "sync_vs_plain_copy": bench.median_ratio(samples, "save_sync_s", "plain_copy_s"),
        "overlapped_blocking_vs_plain_copy": bench.median_ratio(
            samples, "save_overlapped_blocking_s", "plain_copy_s"
        ),
    }
    goals = bench.GOALS
    return {
        **report,
        **{k: bench.stats(v) for k, v in samples.items()},
        "snapshot_is_partition": (
            report["snapshot_model_optimizer_bytes"] == report["partition_bytes"]
        ),
        "ratios": ratios,
        "within_bounds": (
            ratios["sync_vs_plain_copy"] <= goals["sync_vs_plain_copy_max"]
            and ratios["overlapped_blocking_vs_plain_copy"]
            <= goals["overlapped_blocking_vs_plain_copy_max"]
        ),
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the FSDP2 case, one row per rank, medians (min) in ms."""

    def cell(s: dict[str, Any]) -> str:
        return f"{s['median'] * 1000:.1f} ({s['min'] * 1000:.1f})"

    lines = [
        "",
        "FSDP2 (2 ranks, fully_shard): per-rank checkpoint bytes and blocking time.",
        "",
        "| state | rank | partition | checkpoint (model + optimizer) | checkpoint (all) "
        "| plain copy | save() sync | overlapped, blocking | sync / plain | overlapped / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = float(1 << 20)
    for result in results:
        for r in result["ranks"]:
            q = r["ratios"]
            lines.append(
                f"| {result['bytes'] / mib:.0f} MiB | {r['rank']} "
                f"| {r['partition_bytes'] / mib:.2f} MiB "
                f"| {r['snapshot_model_optimizer_bytes'] / mib:.2f} MiB "
                f"| {r['snapshot_bytes'] / mib:.2f} MiB | {cell(r['plain_copy_s'])} "
                f"| {cell(r['save_sync_s'])} | {cell(r['save_overlapped_blocking_s'])} "
                f"| {q['sync_vs_plain_copy']:.2f} | {q['overlapped_blocking_vs_plain_copy']:.2f} |"
            )
    return lines
