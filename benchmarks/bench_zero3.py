"""The ZeRO-3 case of bench_snapshot.py: what `DeepSpeedCheckpointer.save()` copies and blocks.

Two ranks (processes on gloo) build a DeepSpeed ZeRO-3 engine whose parameters plus Adam moments
total `nbytes` and take one step; each then checkpoints its engine through an agent of its own,
sync and overlapped, as bench_snapshot does for a plain model. Reported per rank: the bytes of
its partitions (module partition, fp32 master partition, moments), the bytes a snapshot holds
(every tensor captured, shared storage counted once), the full model's parameter bytes for
contrast, and the blocking times next to a plain copy of the same snapshot tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench_snapshot import GOALS, PlainCopy, Saver, clock, stats
from gemini_ckpt.agent.embedded import EmbeddedAgent

WORLD = 2
LAYERS = 8


def run(nbytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both ranks' measurements for a ZeRO-3 state of about `nbytes` in total."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        mp.start_processes(
            _rank_main,
            args=(nbytes, vars(args), tmp),
            nprocs=WORLD,
            start_method="spawn",
        )
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"total_bytes": nbytes, "world_size": WORLD, "ranks": ranks}


def _engine(nbytes: int) -> Any:
    import deepspeed  # after gemini_ckpt.integrations.deepspeed (the op cache), see _rank_main

    width = max(8, int(math.sqrt(nbytes / (3 * 4 * LAYERS))))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(LAYERS)))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1 << 30,
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    loss = engine(torch.randn(2, width)).square().mean()
    engine.backward(loss)
    engine.step()  # the moments exist from here on
    return engine, width * width * LAYERS * 4


def _rank_main(rank: int, nbytes: int, settings: dict[str, Any], tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    from gemini_ckpt.integrations.deepspeed import DeepSpeedCheckpointer

    args = argparse.Namespace(**settings)
    engine, model_bytes = _engine(nbytes)
    with EmbeddedAgent(world_size=2, memory_limit=8 * nbytes + (64 << 20)) as agent:
        savers = {
            mode: Saver(
                agent,
                i,
                mode,
                (None, None),
                args,
                make=lambda config: DeepSpeedCheckpointer(engine, config=config),
            )
            for i, mode in enumerate(("sync", "overlapped"))
        }
        state = savers["sync"].ckpt.state  # type: ignore[attr-defined]
        captured = {
            t.untyped_storage().data_ptr(): t for t in state.capture(clone_unstable=False).tensors
        }
        plain = PlainCopy(list(captured.values()))
        rows: dict[str, list[float]] = {"plain_copy_s": [], "save_sync_s": [], "overlapped_s": []}
        for repeat in range(args.repeats + 2):  # two warm-up saves map each rank's two slots
            row = {"plain_copy_s": clock(plain)}
            row["save_sync_s"], committed = savers["sync"].sync()
            row["overlapped_s"] = savers["overlapped"].overlapped(committed)
            for key, value in row.items():
                if repeat >= 2:
                    rows[key].append(value)
        for saver in savers.values():
            saver.ckpt.close()
    snapshot = sum(t.numel() * t.element_size() for t in captured.values())
    result = {
        "rank": rank,
        "partition_bytes": state.partition_nbytes(),
        "snapshot_tensor_bytes": snapshot,
        "model_param_bytes": model_bytes,
        **{k: stats(v) for k, v in rows.items()},
        "sync_vs_plain_copy": _ratio(rows["save_sync_s"], rows["plain_copy_s"]),
        "overlapped_blocking_vs_plain_copy": _ratio(rows["overlapped_s"], rows["plain_copy_s"]),
    }
    result["within_goals"] = (
        result["sync_vs_plain_copy"] <= GOALS["sync_vs_plain_copy_max"]
        and result["overlapped_blocking_vs_plain_copy"]
        <= GOALS["overlapped_blocking_vs_plain_copy_max"]
    )
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table: per rank, bytes snapshotted against its partition, and blocking times."""
    lines = [
        "",
        "ZeRO-3, 2 ranks: per-rank snapshot bytes against the rank's partition; times in ms, "
        "median (min).",
        "",
        "| state | rank | partition | snapshot tensors | model params | plain copy | save() sync "
        "| overlapped, blocking | sync / plain | overlapped / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for q in r["ranks"]:
            lines.append(
                f"| {r['total_bytes'] / 2**20:.0f} MiB | {q['rank']} "
                f"| {q['partition_bytes']:,} B | {q['snapshot_tensor_bytes']:,} B "
                f"| {q['model_param_bytes']:,} B "
                f"| {_cell(q['plain_copy_s'])} | {_cell(q['save_sync_s'])} "
                f"| {_cell(q['overlapped_s'])} | {q['sync_vs_plain_copy']:.2f} "
                f"| {q['overlapped_blocking_vs_plain_copy']:.2f} |"
            )
    return lines


def _cell(s: dict[str, Any]) -> str:
    return f"{s['median'] * 1000:.1f} ({s['min'] * 1000:.1f})"
