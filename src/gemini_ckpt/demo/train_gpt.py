"""Demo training script: a small GPT trained with DDP on gloo, checkpointed every iteration.

Runs under `gemini-ckpt launch`/`local` (any torchrun-style launcher that starts a Gemini agent).
Deterministic: two runs with the same arguments end bit-identical, failures or not.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gemini_ckpt import Checkpointer
from gemini_ckpt.demo import final_state
from gemini_ckpt.demo.data import VOCAB, ArithmeticStream
from gemini_ckpt.demo.model import GPTConfig, TinyGPT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo script."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--min-step-time",
        type=float,
        default=0.0,
        help="seconds: sleep so that each iteration takes at least this long, a stand-in for a "
        "larger model's compute (the state and the results do not change)",
    )
    p.add_argument(
        "--final-state",
        type=Path,
        default=None,
        help="directory to write each rank's final state to (for comparisons)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, resuming from the agent's checkpoint after a restart."""
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same initial weights on every rank
    torch.use_deterministic_algorithms(True)
    config = GPTConfig(
        vocab_size=len(VOCAB),
        seq_len=args.seq,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 32),
    )
    # find_unused_parameters=True keeps DDP's gradient buckets in their initial order; without it
    # DDP reorders them after the first iteration of every process, so a restarted process would
    # sum gradients in a different order and drift from the uninterrupted run in the last bits.
    model = DDP(TinyGPT(config), find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps))
    data = ArithmeticStream(rank, args.batch, args.seq, seed=args.seed)
    # Per-rank streams for everything random (dropout uses torch's; the others are seeded so the
    # final states of two runs can be compared bit for bit).
    torch.manual_seed(args.seed + 1 + rank)
    random.seed(args.seed + 1 + rank)
    np.random.seed(args.seed + 1 + rank)

    ckpt = Checkpointer(model, optimizer, lr_scheduler=scheduler, extra_state=data)
    start = ckpt.restore()
    info = ckpt.restore_info
    print(
        f"rank {rank}/{world} pid {os.getpid()}: starting at step {start} "
        f"(state from {info.source if info else '?'})",
        flush=True,
    )
    for step in range(start, args.steps):
        began = time.monotonic()
        tokens, targets = data.next_batch()
        loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        time.sleep(max(0.0, args.min_step_time - (time.monotonic() - began)))
        ckpt.save(step + 1, metrics={"loss": loss.item()})
        print(
            f"step {step + 1} loss {loss.item():.4f} {(time.monotonic() - began) * 1000:.0f} ms",
            flush=True,
        )
    ckpt.close()
    if args.final_state is not None:
        state = final_state.collect(model, optimizer, scheduler, data, args.steps)
        final_state.write(state, args.final_state, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
