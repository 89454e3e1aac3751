"""What each rank of the FSDP2 state test does, in its own process (spawned, real gloo).

Every rank runs its own in-process agent (one rank each), trains a fully sharded GPT, saves,
trains on without saving, restores into fresh sharded objects, and reports what it saw; the test
asserts on the reports.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gemini_ckpt import Checkpointer, RestoreError
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.demo import final_state
from gemini_ckpt.demo.model import GPTConfig, TinyGPT
from gemini_ckpt.snapshot.sharded import local_shard

CONFIG = GPTConfig(vocab_size=16, seq_len=16, d_model=64, n_layers=1, n_heads=2)
SAVED_STEPS = 3


class Nothing:
    """No scheduler or data position: this test's state is the model's and the optimizer's."""

    def state_dict(self) -> dict[str, Any]:
        return {}


def build(mesh: Any | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The GPT (same initial weights everywhere), sharded over `mesh` unless it is None."""
    torch.manual_seed(0)
    model = TinyGPT(CONFIG)
    if mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len))
        model(tokens, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()


def sizes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the parameters and optimizer state: (this rank's shards, the full tensors)."""
    tensors = list(model.parameters())
    tensors += [v for s in optimizer.state.values() for v in s.values()]
    local = sum(local_shard(t).numel() * t.element_size() for t in tensors)
    return local, sum(t.numel() * t.element_size() for t in tensors)


def restore_error(ckpt_config: Any, mesh: Any | None) -> str:
    """The RestoreError of restoring this rank's checkpoint into a model sharded over `mesh`."""
    model, optimizer = build(mesh)
    with Checkpointer(model, optimizer, config=ckpt_config) as ckpt:
        try:
            ckpt.restore()
        except RestoreError as e:
            return str(e)
    return "no error"


def scenario(rank: int, agent: EmbeddedAgent) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,))
    model, optimizer = build(mesh)
    config = agent.trainer_config()
    with Checkpointer(model, optimizer, config=config) as ckpt:
        ckpt.restore()
        for step in range(SAVED_STEPS):
            train(model, optimizer, 1)
            ckpt.save(step + 1)
    # Deep-copied: the collected shards are views of the live model, which trains on below.
    saved = copy.deepcopy(final_state.collect(model, optimizer, Nothing(), Nothing(), SAVED_STEPS))
    local_bytes, full_bytes = sizes(model, optimizer)
    ref = agent.store.locate(0, SAVED_STEPS)
    stored = sum(e.nbytes for e in ref.manifest.entries) if ref else 0
    train(model, optimizer, 2)  # moves on past the checkpoint

    agent.restart()
    fresh_model, fresh_optimizer = build(mesh)
    pointers = [p.to_local().data_ptr() for p in fresh_model.parameters()]
    with Checkpointer(fresh_model, fresh_optimizer, config=agent.trainer_config(generation=1)) as c:
        restored_step = c.restore()
    restored = final_state.collect(fresh_model, fresh_optimizer, Nothing(), Nothing(), SAVED_STEPS)
    difference = final_state.first_difference(saved, restored)
    in_place = pointers == [p.to_local().data_ptr() for p in fresh_model.parameters()]
    train(fresh_model, fresh_optimizer, 1)  # the restored optimizer state steps on its mesh
    # The same checkpoint into other shardings: one rank per mesh (another world size) and none.
    solo = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "solo"))["solo"]
    generation1 = agent.trainer_config(generation=1)
    return {
        "restored_step": restored_step,
        "difference": difference,
        "in_place": in_place,
        "local_bytes": local_bytes,
        "full_bytes": full_bytes,
        "stored_bytes": stored,
        "other_world_size": restore_error(generation1, solo),
        "unsharded": restore_error(generation1, None),
    }


def run_rank(rank: int, init_file: str, run_dir: str, results: Any) -> None:
    """Entry point of one spawned rank: runs the scenario, puts (rank, report or error)."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        with EmbeddedAgent(run_dir=Path(run_dir) / f"rank{rank}") as agent:
            results.put((rank, scenario(rank, agent)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with the traceback
        results.put((rank, {"error": traceback.format_exc()}))
