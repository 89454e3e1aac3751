"""A tiny training script for launcher tests: a linear model on gloo, checkpointed every step."""

import argparse
import time

import torch
import torch.distributed as dist

from gemini_ckpt import Checkpointer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--raise-at", type=int, default=0, help="raise at this step, in every run")
parser.add_argument("--sleep", type=float, default=0.0, help="seconds of idle compute per step")
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 16))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with Checkpointer(model, optimizer) as ckpt:
    start = ckpt.restore()
    print(f"rank {dist.get_rank()} starts at {start} from {ckpt.restore_info.source}", flush=True)
    for step in range(start, args.steps):
        if step + 1 == args.raise_at:
            raise RuntimeError(f"boom at step {step + 1}")
        time.sleep(args.sleep)
        model(torch.randn(4, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ckpt.save(step + 1)
dist.destroy_process_group()
