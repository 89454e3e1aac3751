"""Background persisting from memory, and restoring a machine with empty memory from disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gemini_ckpt import Checkpointer
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.agent.persister import Persister, PersistPolicy
from gemini_ckpt.agent.staging import stage_from_persistent
from gemini_ckpt.errors import CorruptCheckpointError
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.recovery.plan import PERSISTENT_TIER, plan_restore
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.persistent import PersistentStore
from helpers.models import Position, assert_same, make_model, train_step


def test_policy():
    policy = PersistPolicy(every_steps=10)
    assert policy.due(20, 0.0, None) == (True, "step 20 is a multiple of 10")
    assert policy.due(21, 0.0, None)[0] is False
    timed = PersistPolicy(every_s=60)
    assert timed.due(3, 100.0, None)[0] is True
    assert timed.due(4, 130.0, 100.0)[0] is False
    assert timed.due(5, 161.0, 100.0)[0] is True
    assert not PersistPolicy().enabled


def train_and_persist(agent: EmbeddedAgent, persistent: PersistentStore, steps: int):
    persister = Persister(
        agent.store, persistent, range(1), PersistPolicy(every_steps=3), EventLog(None)
    )
    agent.service._on_step = persister.offer  # the real agent wires this at construction
    persister.start()
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    position = Position()
    with Checkpointer(
        model, optimizer, extra_state=position, config=agent.trainer_config(chunk_size=4096)
    ) as ckpt:
        for step in range(steps):
            train_step(model, optimizer, position)
            ckpt.save(step + 1)
            time.sleep(0.02)
    persister.close()
    return model, optimizer


def test_persisted_steps_restore_a_machine_with_empty_memory(tmp_path):
    persistent = PersistentStore(tmp_path / "ckpt", "job", keep=2)
    with EmbeddedAgent(run_dir=tmp_path / "a") as old:
        _model, _optimizer = train_and_persist(old, persistent, 7)
        with old.store.reading(0, 6) as ref:
            assert ref is not None
    assert persistent.inventory() == {0: [3, 6]}

    with EmbeddedAgent(run_dir=tmp_path / "b") as new:  # a replacement: nothing in memory
        plan = plan_restore(1, 1, {0: new.store.inventory()}, persistent.inventory())
        assert (plan.step, plan.sources) == (6, {0: PERSISTENT_TIER})
        copier = ChunkCopier(2)
        try:
            stage_from_persistent(new.store, persistent, 0, 6, copier)
        finally:
            copier.close()
        assert new.store.inventory() == {0: [6]}
        new.generation = 1
        new.service.open_generation(1, plan)
        fresh = make_model()
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        with Checkpointer(
            fresh, fresh_opt, extra_state=Position(), config=new.trainer_config()
        ) as ckpt:
            assert ckpt.restore() == 6
            assert ckpt.restore_info.source == PERSISTENT_TIER


def test_a_corrupt_persisted_copy_is_set_aside(tmp_path):
    persistent = PersistentStore(tmp_path / "ckpt", "job", keep=2)
    with EmbeddedAgent(run_dir=tmp_path / "a") as old:
        train_and_persist(old, persistent, 6)
    data = Path(persistent.step_dir(6)) / "rank-0.safetensors"
    with data.open("r+b") as f:
        f.seek(-64, 2)
        f.write(b"\xff" * 8)
    with EmbeddedAgent(run_dir=tmp_path / "b") as new:
        copier = ChunkCopier(2)
        try:
            with pytest.raises(CorruptCheckpointError, match="persisted rank 0 step 6"):
                stage_from_persistent(new.store, persistent, 0, 6, copier)
        finally:
            copier.close()
        assert new.store.inventory() == {0: []}
    assert persistent.inventory() == {0: [3]}
    assert (Path(persistent.step_dir(6)) / "rank-0.manifest.json.corrupt").exists()


def test_a_persisted_state_equals_the_trained_one(tmp_path):
    persistent = PersistentStore(tmp_path / "ckpt", "job", keep=1)
    with EmbeddedAgent(run_dir=tmp_path / "a") as agent:
        model, _ = train_and_persist(agent, persistent, 3)
    from safetensors.torch import load_file

    tensors = load_file(str(Path(persistent.step_dir(3)) / "rank-0.safetensors"))
    assert_same({k: tensors[f"model.{k}"] for k in model.state_dict()}, model.state_dict())
