"""FSDP2 example: the demo GPT fully sharded with `fully_shard`, checkpointed every iteration.

Each rank holds only its shard of every parameter and of the AdamW state (DTensors with Shard(0)
placements), and `Checkpointer` snapshots exactly that shard, with no gather. The three Gemini
lines are the same as for DDP or a single process. Launch it on the one-host test bed:

    gemini-ckpt local --machines 2 --nproc-per-machine 2 examples/fsdp2_gpt/train.py --steps 40

or with `gemini-ckpt launch` on real machines (any torchrun options). Options are the demo
trainer's (`--steps`, `--d-model`, `--layers`, `--batch`, `--seq`, `--lr`, `--final-state`).
Needs torch >= 2.6 (`torch.distributed.fsdp.fully_shard`). FSDP1 (`FullyShardedDataParallel`)
is not supported.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gemini_ckpt import Checkpointer
from gemini_ckpt.demo import final_state
from gemini_ckpt.demo.data import VOCAB, ArithmeticStream
from gemini_ckpt.demo.model import GPTConfig, TinyGPT
from gemini_ckpt.demo.train_gpt import parse_args


def main() -> None:
    """Train, resuming from the agent's checkpoint after a restart."""
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank, before sharding
    torch.use_deterministic_algorithms(True)
    config = GPTConfig(
        vocab_size=len(VOCAB),
        seq_len=args.seq,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 32),
    )
    model = TinyGPT(config)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)  # one all-gather per block in forward and backward
    fully_shard(model, mesh=mesh)  # the rest: embeddings (tied to the head), final norm
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps))
    data = ArithmeticStream(rank, args.batch, args.seq, seed=args.seed)
    torch.manual_seed(args.seed + 1 + rank)  # per-rank streams (dropout), seeded for exactness
    random.seed(args.seed + 1 + rank)
    np.random.seed(args.seed + 1 + rank)

    ckpt = Checkpointer(model, optimizer, lr_scheduler=scheduler, extra_state=data)
    start = ckpt.restore()  # loads this rank's shards in place
    info = ckpt.restore_info
    print(
        f"rank {rank}/{world} pid {os.getpid()}: starting at step {start} "
        f"(state from {info.source if info else '?'})",
        flush=True,
    )
    for step in range(start, args.steps):
        tokens, targets = data.next_batch()
        loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ckpt.save(step + 1, metrics={"loss": loss.item()})
        print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    ckpt.close()
    if args.final_state is not None:
        state = final_state.collect(model, optimizer, scheduler, data, args.steps)
        final_state.write(state, args.final_state, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
