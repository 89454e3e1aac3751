"""Emulated-accelerator trainer: a Table 2 model's real collectives, compute as sleep.

Each iteration runs the communication of the chosen model and parallelism on gloo, exactly as
sized (scaled, see `emulated_model`), while "compute" sleeps for the time the model's FLOPs would
take; the CPU stays mostly idle, as on a GPU machine, and the network is the shared resource.
Each rank's state is real: fp32 master weights and two Adam-like moments (ZeRO-3: its partition of
every layer; DP: a 1/N share), updated in place from the reduced gradients every iteration and
checkpointed every iteration. Deterministic: two runs with the same arguments end bit-identical,
failures or not.

Run it on the test bed with `gemini-ckpt local ... --workload emulated -- --model gpt2-20b`.
Per-iteration timings (monotonic clock, plus each collective's issue and completion) go to
`--timings DIR/rank<r>.jsonl`, one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gemini_ckpt import Checkpointer
from gemini_ckpt.demo import final_state
from gemini_ckpt.demo.emulated_comm import CollectiveLog, DataParallel, Zero3
from gemini_ckpt.demo.emulated_model import MODELS, PARALLELISMS, EmulationPlan, plan_for
from gemini_ckpt.interleave.profile import idle_spans

CHECKPOINT_MODES = ("none", "gemini", "blocking")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the emulated trainer."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2-10b")
    p.add_argument("--parallel", choices=PARALLELISMS, default="zero3")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=int, default=0, help="divide element counts by this")
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="keep only this many transformer layers (0: the model's own count); fewer, larger "
        "collectives with longer compute between them, as a deep model's are on a GPU",
    )
    p.add_argument("--tflops", type=float, default=1.0, help="emulated accelerator throughput")
    p.add_argument(
        "--compute-ms", type=float, default=0.0, help="compute per iteration (overrides --tflops)"
    )
    p.add_argument(
        "--checkpoint",
        choices=CHECKPOINT_MODES,
        default="gemini",
        help="none: no Checkpointer; gemini: save every iteration; blocking: save, then wait "
        "until the step is committed and on every peer",
    )
    p.add_argument("--replicated-timeout", type=float, default=60.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234, help="seeds every RNG (per rank)")
    p.add_argument("--timings", type=Path, default=None, help="directory for rank<r>.jsonl")
    p.add_argument("--final-state", type=Path, default=None)
    return p.parse_args(argv)


class ShardState(torch.nn.Module):
    """This rank's fp32 master weights, one flat tensor (its partition or share)."""

    def __init__(self, elements: int) -> None:
        super().__init__()
        # Deterministic, rank-independent start: small multiples of 2^-10.
        start = (torch.arange(elements, dtype=torch.float32) % 1024) / 1024
        self.master = torch.nn.Parameter(start, requires_grad=False)


class EmulatedAdam(torch.optim.Optimizer):
    """Adam's moments without the square root: a cheap, exact, in-place update of real state.

    `grad` is set by the caller; `step()` is a real optimizer step, so the Checkpointer's
    pre-hook waits for the background copy before the state changes.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr, "betas": (0.875, 0.9375)})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Apply `p.grad` to every parameter (there is no loss to re-evaluate)."""
        del closure
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.add_(state["m"], alpha=-group["lr"])


class Position:
    """The iteration count, as the data position a real trainer would checkpoint."""

    def __init__(self) -> None:
        self.iteration = 0

    def state_dict(self) -> dict[str, int]:
        """Plain data."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """From `state_dict()`."""
        self.iteration = int(state["iteration"])


class TimingLog:
    """Appends one JSON line per iteration to `directory/rank<r>.jsonl` (nothing if None)."""

    def __init__(self, directory: Path | None, rank: int) -> None:
        self._path = None if directory is None else directory / f"rank{rank}.jsonl"
        self._rank = rank
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    def write(
        self, step: int, start: float, end: float, collectives: list[list[Any]] | None = None
    ) -> None:
        """One iteration: monotonic start and end.

        With its `collectives` (recorded by the emulated workload), also the idle network time
        and each collective's times relative to the start.
        """
        if self._path is None:
            return
        record: dict[str, Any] = {
            "rank": self._rank,
            "pid": os.getpid(),
            "step": step,
            "start": start,
            "end": end,
            "duration": end - start,
            "wall_end": time.time(),
        }
        if collectives is not None:
            busy = [
                (c[1] - start, (c[2] if c[2] is not None else end) - start) for c in collectives
            ]
            profile = idle_spans(busy, end - start)
            record["busy_s"] = (end - start) - profile.idle_seconds
            record["idle_s"] = profile.idle_seconds
            record["collectives"] = [
                [c[0], round(a, 6), round(b, 6)]
                for c, (a, b) in zip(collectives, busy, strict=True)
            ]
        with self._path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def make_plan(args: argparse.Namespace, world: int) -> EmulationPlan:
    """The plan the options describe."""
    return plan_for(
        args.model,
        args.parallel,
        world,
        scale=args.scale,
        tflops=args.tflops,
        compute_s=args.compute_ms / 1000,
        layers=args.layers,
    )


def checkpointer_for(
    args: argparse.Namespace, model: ShardState, optimizer: EmulatedAdam, extra: list[Any]
) -> tuple[Checkpointer | None, int]:
    """The Checkpointer `--checkpoint` asks for (None for `none`) and the step to start at."""
    if args.checkpoint == "none":
        return None, 0
    scheduler, position = extra
    ckpt = Checkpointer(model, optimizer, lr_scheduler=scheduler, extra_state=position)
    if args.checkpoint == "blocking" and not hasattr(ckpt, "wait_replicated"):
        raise SystemExit("--checkpoint blocking needs Checkpointer.wait_replicated")
    return ckpt, ckpt.restore()


def seed_all(seed: int) -> None:
    """Seed torch, Python and NumPy.

    Nothing here draws random numbers, but the RNG states are checkpointed and compared.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def main(argv: list[str] | None = None) -> None:
    """Train, resuming from the agent's checkpoint after a restart."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = make_plan(args, world)
    seed_all(args.seed + rank)
    model = ShardState(plan.state_elements())
    optimizer = EmulatedAdam([model.master], args.lr)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    position = Position()
    log = CollectiveLog()
    comm: DataParallel | Zero3 = (
        Zero3(plan, rank, log) if args.parallel == "zero3" else DataParallel(plan, rank, log)
    )
    ckpt, start = checkpointer_for(args, model, optimizer, [scheduler, position])
    print(
        f"rank {rank}/{world} pid {os.getpid()}: {plan.shape.name} {plan.parallel} scale 1/"
        f"{plan.scale}: {plan.parameters() / 1e6:.1f} M parameters, checkpoint "
        f"{plan.checkpoint_bytes() / 2**20:.1f} MiB/rank, {plan.wire_bytes() / 2**20:.1f} MiB "
        f"sent/iteration, compute {plan.compute_seconds():.3f} s; starting at step {start}",
        flush=True,
    )
    timings = TimingLog(args.timings, rank)
    grad = torch.zeros_like(model.master)
    model.master.grad = grad
    for step in range(start, args.steps):
        began = time.monotonic()
        if isinstance(comm, Zero3):
            comm.run(step, model.master, grad)
        else:
            comm.run(step, grad)
        optimizer.step()
        scheduler.step()
        position.iteration = step + 1
        if ckpt is not None:
            ckpt.save(step + 1)
            if args.checkpoint == "blocking":
                ckpt.wait()
                ckpt.wait_replicated(step + 1, timeout_s=args.replicated_timeout)
        timings.write(step + 1, began, time.monotonic(), log.take())
    log.close()
    if ckpt is not None:
        ckpt.close()
    if args.final_state is not None:
        state = final_state.collect(model, optimizer, scheduler, position, args.steps)
        final_state.write(state, args.final_state, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
