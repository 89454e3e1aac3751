"""The demo GPT trained with DeepSpeed ZeRO (stage 1, 2 or 3) on gloo, checkpointed every iteration.

    gemini-ckpt local --machines 2 --nproc-per-machine 2 --fault kill-worker@step=12,rank=3 \
        examples/deepspeed_gpt/train.py --zero-stage 3

Deterministic: two runs with the same arguments end bit-identical, failures or not.
`--final-state DIR` writes each rank's final state there for such comparisons;
`--load-deepspeed DIR` starts from a checkpoint in DeepSpeed's own layout (one written by
`gemini-ckpt export --format deepspeed`) through `engine.load_checkpoint`. `--checkpoint none`
trains without Gemini (the baseline of `benchmarks/bench_interleave.py --workload deepspeed`);
`--timings DIR` writes each iteration's start and end to `DIR/rank<r>.jsonl`.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemini_ckpt.demo import final_state
from gemini_ckpt.demo.data import VOCAB, ArithmeticStream
from gemini_ckpt.demo.emulated import TimingLog
from gemini_ckpt.demo.model import GPTConfig, TinyGPT
from gemini_ckpt.integrations.deepspeed import DeepSpeedCheckpointer
from gemini_ckpt.integrations.deepspeed.layout import load_exported_extras
from gemini_ckpt.snapshot.tree import flatten

# isort: split
import deepspeed  # after gemini_ckpt.integrations.deepspeed, which sets the op cache directory


def parse_args() -> argparse.Namespace:
    """The command line; `--help` lists it."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=3)
    p.add_argument("--offload", action="store_true", help="offload the optimizer to the CPU")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--final-state", type=Path, default=None)
    p.add_argument("--load-deepspeed", type=Path, default=None)
    p.add_argument("--checkpoint", choices=("gemini", "none"), default="gemini")
    p.add_argument("--timings", type=Path, default=None, help="directory for rank<r>.jsonl")
    return p.parse_args()


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSpeed's configuration for the chosen ZeRO stage (and optimizer offload)."""
    zero: dict[str, Any] = {"stage": args.zero_stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": 5, "total_num_steps": max(6, args.steps)},
        },
        "steps_per_print": 1 << 30,
    }
    if args.offload:
        # ZeRO-Offload steps with DeepSpeedCPUAdam (compiled on first use, ~40 s).
        zero["offload_optimizer"] = {"device": "cpu"}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.01}}
    return config


def build_engine(args: argparse.Namespace) -> Any:
    """The DeepSpeed engine of the demo GPT, its initial weights the same on every rank."""
    torch.manual_seed(args.seed)
    config = GPTConfig(
        vocab_size=len(VOCAB),
        seq_len=args.seq,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 32),
    )
    model = TinyGPT(config)
    optimizer = (
        None
        if args.offload
        else torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(args))
    return engine


def main() -> None:
    """Train `--steps` iterations, checkpointing each one (unless `--checkpoint none`)."""
    args = parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every torch.empty with NaN; ZeRO 1-2 allocate gradient buckets
    # of reduce_bucket_size (5e8 elements) each backward, which that turns into seconds per step.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    engine = build_engine(args)
    data = ArithmeticStream(rank, args.batch, args.seq, seed=args.seed)
    torch.manual_seed(args.seed + 1 + rank)
    random.seed(args.seed + 1 + rank)
    np.random.seed(args.seed + 1 + rank)

    ckpt = DeepSpeedCheckpointer(engine, extra_state=data) if args.checkpoint == "gemini" else None
    start = ckpt.restore() if ckpt is not None else 0
    source = ckpt.restore_info.source if ckpt is not None and ckpt.restore_info else "?"
    if start == 0 and args.load_deepspeed is not None:
        _, client_state = engine.load_checkpoint(str(args.load_deepspeed))
        load_exported_extras(client_state, data, engine)
        start, source = engine.global_steps, f"DeepSpeed checkpoint {args.load_deepspeed}"
    print(f"rank {rank}/{world} pid {os.getpid()}: starting at step {start} ({source})", flush=True)
    timings = TimingLog(args.timings, rank)
    for step in range(start, args.steps):
        began = time.monotonic()
        tokens, targets = data.next_batch()
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        if ckpt is not None:
            ckpt.save(step + 1, metrics={"loss": loss.item()})
        ended = time.monotonic()
        timings.write(step + 1, began, ended)
        print(f"step {step + 1} loss {loss.item():.4f} {(ended - began) * 1000:.0f} ms", flush=True)
    if ckpt is not None:
        ckpt.close()
    if args.final_state is not None and ckpt is not None:
        # Everything a restore loads, plus (stages 1-2) the module's weights derived from it.
        flat = flatten(ckpt.state.tree())
        module = engine.module.state_dict() if args.zero_stage < 3 else None
        state = {"skeleton": repr(flat.skeleton), "tensors": flat.tensors, "module": module}
        final_state.write(state, args.final_state, rank)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
