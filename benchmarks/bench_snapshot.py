"""How long `Checkpointer.save()` blocks training, next to the physical limit and to torch.save.

For each state size, a model + Adam state of that many bytes is checkpointed through a real agent
service (shared memory, control socket) in this process, and compared with:

* plain copy: the same tensors copied into a preallocated, warm buffer (the memory-bandwidth limit);
* torch.save to /dev/shm (what a naive in-memory checkpoint costs) and to disk (with fsync).

Sync saves: the time inside save() (the bytes are copied when it returns; checksums and the commit
follow in the background, reported as "sync, until committed"). Overlapped saves are followed by a
compute phase as long as the copy (the time a sync save takes until committed, measured in the
same run), then the wait the optimizer-step hook does; "blocking" is the time inside save() plus
that wait. A stricter variant uses a compute phase only as long as the plain copy. The compute
phase sleeps by default, leaving the CPU to the copy as a GPU step would (`--compute matmul` keeps
one core busy instead). Writes JSON with min and median of `--repeats` runs and the ratios the
goals are stated in.

The FSDP2 case (`--fsdp2-sizes`, `fsdp2_case.py`) shards a state of that total size over 2 ranks
with `fully_shard` and times each rank's saves the same way against a copy of its own shards; it
also reports the bytes each rank's checkpoint holds, which must be its partition.

    python benchmarks/bench_snapshot.py --sizes 64MiB,256MiB,1GiB --out bench-results/snapshot.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemini_ckpt import Checkpointer
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.config import TrainerConfig, parse_size
from gemini_ckpt.snapshot.checkpointer import StateCheckpointer

GOALS = {
    "sync_vs_plain_copy_max": 1.3,
    "sync_vs_torch_save_shm_max": 0.3,
    "overlapped_blocking_vs_plain_copy_max": 0.25,
    "goal_sizes": [256 << 20, 1 << 30],
}


def make_state(nbytes: int, tensors: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose parameters plus Adam moments total about `nbytes` (fp32, 3 copies)."""
    per_tensor = max(1, nbytes // (3 * 4 * tensors))
    model = torch.nn.ParameterList(
        torch.nn.Parameter(torch.randn(per_tensor)) for _ in range(tensors)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def stats(samples: list[float]) -> dict[str, Any]:
    """Min, median and every sample, in seconds."""
    return {"min": min(samples), "median": statistics.median(samples), "samples": samples}


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a checkpoint of this state holds."""
    out = [p.detach() for p in model.parameters()]
    for per_param in optimizer.state.values():
        out += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return out


class PlainCopy:
    """The physical limit: the same bytes copied into a preallocated, already-touched buffer."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        total = sum(t.numel() * t.element_size() for t in tensors)
        self._dst = torch.empty(total, dtype=torch.uint8)
        self._dst.fill_(0)
        self._pairs, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            self._pairs.append((self._dst[offset : offset + n].view(t.dtype), t.reshape(-1)))
            offset += n

    def __call__(self) -> None:
        for dst, src in self._pairs:
            dst.copy_(src)


def busy(seconds: float, kind: str) -> None:
    """A compute phase of about `seconds`."""
    if kind == "sleep":
        time.sleep(seconds)
        return
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def clock(fn: Callable[[], Any]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Saver:
    """One rank's Checkpointer over the shared state, timing its saves.

    `make` builds the checkpointer from its configuration (default: `Checkpointer(*state)`).
    """

    def __init__(
        self,
        agent: EmbeddedAgent,
        rank: int,
        mode: str,
        state: tuple[Any, Any],
        args: argparse.Namespace,
        make: Callable[[TrainerConfig], StateCheckpointer] | None = None,
    ) -> None:
        config = agent.trainer_config(
            rank=rank,
            snapshot_mode=mode,
            copy_threads=args.threads,
            chunk_size=parse_size(args.chunk_size),
        )
        self.ckpt = make(config) if make else Checkpointer(*state, config=config)
        self.step = self.ckpt.restore()
        self.kind = args.compute

    def sync(self) -> tuple[float, float]:
        """(time in save(), time until committed)."""
        self.step += 1
        start = time.perf_counter()
        self.ckpt.save(self.step)
        called = time.perf_counter() - start
        self.ckpt.wait()
        return called, time.perf_counter() - start

    def overlapped(self, compute_s: float) -> float:
        """Time blocked: in save() plus the wait after a compute phase of `compute_s`."""
        self.step += 1
        blocked = clock(lambda: self.ckpt.save(self.step))
        busy(compute_s, self.kind)
        return blocked + clock(self.ckpt.wait)


def torch_save(state: tuple[Any, Any], directory: Path, fsync: bool) -> float:
    """Seconds for torch.save of the same state to a new file in `directory`."""
    model, optimizer = state
    path = directory / f"bench-{os.getpid()}.pt"
    start = time.perf_counter()
    with path.open("wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    took = time.perf_counter() - start
    path.unlink()
    return took


SAVE_SAMPLES = (
    "plain_copy_s",
    "save_sync_s",
    "save_sync_until_committed_s",
    "save_overlapped_blocking_s",
    "save_overlapped_blocking_short_compute_s",
)


def time_saves(
    agent: EmbeddedAgent, state: tuple[Any, Any], plain: PlainCopy, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Samples of the plain copy and of each kind of save, repeat by repeat (and the warm-up's).

    Ranks 0-2 of `agent` checkpoint `state`: a sync saver and two overlapped ones, with a compute
    phase as long as the sync save until committed, or as the plain copy.
    """
    samples: dict[str, list[float]] = {k: [] for k in SAVE_SAMPLES}
    first_saves: dict[str, list[float]] = {k: [] for k in SAVE_SAMPLES}
    sync = Saver(agent, 0, "sync", state, args)
    overlapped = Saver(agent, 1, "overlapped", state, args)
    short = Saver(agent, 2, "overlapped", state, args)
    warmup = 2  # each rank's first two saves allocate and map its two slots (reported apart)
    for repeat in range(args.repeats + warmup):
        row = {"plain_copy_s": clock(plain)}
        row["save_sync_s"], row["save_sync_until_committed_s"] = sync.sync()
        # "A compute phase as long as the copy": as long as this repeat's sync save took.
        row["save_overlapped_blocking_s"] = overlapped.overlapped(
            row["save_sync_until_committed_s"]
        )
        row["save_overlapped_blocking_short_compute_s"] = short.overlapped(row["plain_copy_s"])
        target = samples if repeat >= warmup else first_saves
        for key, value in row.items():
            target[key].append(value)
    for saver in (sync, overlapped, short):
        saver.ckpt.close()
    return samples, first_saves


def run_size(nbytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one state size.

    The plain copy and Gemini's saves are interleaved repeat by repeat, so a slow spell of a
    shared machine hits the limit and the measured path alike. torch.save runs afterwards: each
    call writes and frees a file as large as the state, and on a virtual machine that churn slows
    whatever runs next for a while.
    """
    state = make_state(nbytes)
    tensors = state_tensors(*state)
    total = sum(t.numel() * t.element_size() for t in tensors)
    with EmbeddedAgent(world_size=3, memory_limit=7 * total + (64 << 20)) as agent:
        samples, first_saves = time_saves(agent, state, PlainCopy(tensors), args)
    samples["torch_save_shm_s"], samples["torch_save_disk_fsync_s"] = [], []
    for _ in range(args.repeats):
        samples["torch_save_shm_s"].append(torch_save(state, Path("/dev/shm"), fsync=False))
        samples["torch_save_disk_fsync_s"].append(
            torch_save(state, Path(args.disk_dir), fsync=True)
        )
    result: dict[str, Any] = {"bytes": total, **{k: stats(v) for k, v in samples.items()}}
    result["first_saves_s"] = {
        k: first_saves[k] for k in ("save_sync_s", "save_overlapped_blocking_s")
    }
    result["ratios"] = {
        "sync_vs_plain_copy": median_ratio(samples, "save_sync_s", "plain_copy_s"),
        "sync_vs_torch_save_shm": (
            statistics.median(samples["save_sync_s"])
            / statistics.median(samples["torch_save_shm_s"])
        ),
        "overlapped_blocking_vs_plain_copy": median_ratio(
            samples, "save_overlapped_blocking_s", "plain_copy_s"
        ),
        "overlapped_blocking_vs_plain_copy_short_compute": median_ratio(
            samples, "save_overlapped_blocking_short_compute_s", "plain_copy_s"
        ),
        "sync_committed_vs_plain_copy": median_ratio(
            samples, "save_sync_until_committed_s", "plain_copy_s"
        ),
    }
    result["meets_goals"] = _meets(total, result["ratios"])
    return result


def median_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of the per-repeat ratio (both measured within the same repeat)."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def _meets(total: int, ratios: dict[str, float]) -> bool | None:
    if not any(abs(total - size) <= size * 0.01 for size in GOALS["goal_sizes"]):
        return None
    return (
        ratios["sync_vs_plain_copy"] <= GOALS["sync_vs_plain_copy_max"]
        and ratios["sync_vs_torch_save_shm"] <= GOALS["sync_vs_torch_save_shm_max"]
        and ratios["overlapped_blocking_vs_plain_copy"]
        <= GOALS["overlapped_blocking_vs_plain_copy_max"]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="64MiB,256MiB,1GiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="copy threads per trainer")
    p.add_argument("--chunk-size", default="4MiB")
    p.add_argument("--compute", choices=["sleep", "matmul"], default="sleep")
    p.add_argument("--disk-dir", default=tempfile.gettempdir())
    p.add_argument(
        "--fsdp2-sizes",
        default="512MiB",
        help="total state sizes of the FSDP2 case, sharded over 2 ranks ('' skips it)",
    )
    p.add_argument(
        "--zero3-sizes",
        default="",
        help="also checkpoint a DeepSpeed ZeRO-3 engine of these total state sizes, 2 ranks "
        "(needs the deepspeed extra); empty: skip",
    )
    p.add_argument("--out", default="bench-results/snapshot.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, print a table; return the results."""
    args = parse_args(argv)
    results = [run_size(parse_size(s), args) for s in args.sizes.split(",")]
    fsdp2 = []
    if args.fsdp2_sizes:
        # Imported here: it imports this module, and only the FSDP2 case needs torch's FSDP.
        import fsdp2_case

        fsdp2 = [fsdp2_case.run_fsdp2(parse_size(s), args) for s in args.fsdp2_sizes.split(",")]
    report = {
        "benchmark": "snapshot",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "goals": GOALS,
        "results": results,
        "fsdp2": fsdp2,
    }
    if args.zero3_sizes:
        import bench_zero3  # DeepSpeed is an optional extra

        report["zero3"] = [
            bench_zero3.run(parse_size(s), args) for s in args.zero3_sizes.split(",")
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for line in table(report):
        print(line)
    if fsdp2:
        for line in fsdp2_case.table(fsdp2):
            print(line)
    if "zero3" in report:
        import bench_zero3

        for line in bench_zero3.table(report["zero3"]):
            print(line)
    return report


def table(report: dict[str, Any]) -> list[str]:
    """Markdown table of medians (min in parentheses), in milliseconds."""

    def cell(s: dict[str, Any]) -> str:
        return f"{s['median'] * 1000:.1f} ({s['min'] * 1000:.1f})"

    lines = [
        "Medians over repeats in ms (min in parentheses). Ratios to the plain copy are medians of"
        " per-repeat ratios; sync / torch.save is a ratio of medians.",
        "",
        "| state | plain copy | save() sync | sync, until committed | overlapped, blocking "
        "| overlapped, blocking (compute = plain copy) | torch.save /dev/shm "
        "| torch.save disk+fsync | sync / plain | sync / torch.save shm | overlapped / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        q = r["ratios"]
        lines.append(
            f"| {r['bytes'] / 2**20:.0f} MiB | {cell(r['plain_copy_s'])} "
            f"| {cell(r['save_sync_s'])} "
            f"| {cell(r['save_sync_until_committed_s'])} "
            f"| {cell(r['save_overlapped_blocking_s'])} "
            f"| {cell(r['save_overlapped_blocking_short_compute_s'])} "
            f"| {cell(r['torch_save_shm_s'])} | {cell(r['torch_save_disk_fsync_s'])} "
            f"| {q['sync_vs_plain_copy']:.2f} | {q['sync_vs_torch_save_shm']:.2f} "
            f"| {q['overlapped_blocking_vs_plain_copy']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    main()
