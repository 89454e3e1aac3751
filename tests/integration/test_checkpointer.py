"""A real Checkpointer against a real agent service (shared memory, Unix socket) in this process."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist

from gemini_ckpt import Checkpointer, CorruptCheckpointError, MemoryBudgetError, RestoreError
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.errors import GeminiError, RecoveryError, SnapshotError
from gemini_ckpt.snapshot.agent_client import AgentClient
from gemini_ckpt.snapshot.state import TrainingState
from helpers.models import Position, assert_same, make_model, train_step


def setup(lr=0.01):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler, Position()


def full_state(model, optimizer, scheduler, position):
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": position.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )


def run_steps(ckpt, objects, start, stop):
    model, optimizer, scheduler, position = objects
    for step in range(start, stop):
        train_step(model, optimizer, position)
        scheduler.step()
        ckpt.save(step + 1)


def uninterrupted(steps):
    objects = setup()
    for _ in range(steps):
        train_step(objects[0], objects[1], objects[3])
        objects[2].step()
    return full_state(*objects)


@pytest.mark.parametrize("mode", ["overlapped", "sync"])
def test_restore_continues_bit_identically(agent: EmbeddedAgent, mode: str):
    expected = uninterrupted(9)
    objects = setup()
    ckpt = Checkpointer(
        objects[0],
        objects[1],
        lr_scheduler=objects[2],
        extra_state=objects[3],
        config=agent.trainer_config(snapshot_mode=mode, chunk_size=4096),
    )
    assert ckpt.restore() == 0
    run_steps(ckpt, objects, 0, 6)
    ckpt.close()  # the trainer goes away after step 6; the agent keeps its memory

    plan = agent.restart()
    assert plan.step == 6
    fresh = setup(lr=0.5)  # a new incarnation starts from scrambled state
    with torch.no_grad():
        for p in fresh[0].parameters():
            p.add_(1.0)
    torch.manual_seed(999)
    ckpt = Checkpointer(
        fresh[0],
        fresh[1],
        lr_scheduler=fresh[2],
        extra_state=fresh[3],
        config=agent.trainer_config(snapshot_mode=mode, chunk_size=4096),
    )
    assert ckpt.restore() == 6
    assert ckpt.restore_info.source == "local memory"
    assert ckpt.restore_info.chunks_verified > 1
    run_steps(ckpt, fresh, 6, 9)
    ckpt.close()
    assert_same(full_state(*fresh), expected)
    # This machine's part of the recovery timeline (sent by the reporter thread).
    deadline = time.monotonic() + 5
    while "first_step_at" not in agent.timeline.get(1, {}) and time.monotonic() < deadline:
        time.sleep(0.01)
    part = agent.timeline[1]
    assert part["first_step"] == 7
    assert part["restored_at"] <= part["first_step_at"]
    assert part["restore_s"] > 0
    assert 0 not in agent.timeline  # the job's start is not a recovery


def test_buffers_are_captured_at_save_time_and_parameters_are_not_copied_early():
    model, optimizer, *_ = setup()
    state = TrainingState(model, [optimizer])
    train_step(model, optimizer, Position())
    flat = state.capture(clone_unstable=True)
    stable = state.stable_storages()
    bn = model[3]
    by_ptr = {t.untyped_storage().data_ptr() for t in flat.tensors}
    assert bn.running_mean.untyped_storage().data_ptr() not in by_ptr  # cloned: forward mutates it
    assert model[2].weight.untyped_storage().data_ptr() in by_ptr  # referenced: optimizer waits
    assert all(
        t.untyped_storage().data_ptr() in stable
        or t.untyped_storage().data_ptr()
        not in {b.untyped_storage().data_ptr() for b in model.buffers()}
        for t in flat.tensors
    )


def test_forward_after_save_does_not_leak_into_the_checkpoint(agent: EmbeddedAgent):
    model, optimizer, _scheduler, position = setup()
    ckpt = Checkpointer(model, optimizer, config=agent.trainer_config(chunk_size=4096))
    ckpt.restore()
    train_step(model, optimizer, position)
    ckpt.save(1)
    saved_mean = model[3].running_mean.clone()
    model[3].running_mean.add_(100.0)  # what the next forward pass does, in place
    ckpt.close()
    agent.restart()
    model2, optimizer2, *_ = setup()
    ckpt2 = Checkpointer(model2, optimizer2, config=agent.trainer_config())
    assert ckpt2.restore() == 1
    ckpt2.close()
    assert torch.equal(model2[3].running_mean, saved_mean)


def test_corrupt_chunk_is_refused_and_the_previous_step_used(agent: EmbeddedAgent):
    model, optimizer, _scheduler, position = setup()
    ckpt = Checkpointer(model, optimizer, config=agent.trainer_config(chunk_size=4096))
    ckpt.restore()
    for step in range(3):
        train_step(model, optimizer, position)
        ckpt.save(step + 1)
    ckpt.close()
    agent.restart()
    ref = agent.store.locate(0, 3)
    with ref.path.open("r+b") as f:  # flip one bit in chunk 2 of step 3, in shared memory
        f.seek(2 * 4096 + 100)
        byte = f.read(1)
        f.seek(2 * 4096 + 100)
        f.write(bytes([byte[0] ^ 0x01]))

    victim, victim_opt, *_ = setup(lr=0.3)
    before = copy.deepcopy(victim.state_dict())
    ckpt = Checkpointer(victim, victim_opt, config=agent.trainer_config())
    with pytest.raises(
        CorruptCheckpointError,
        match=r"rank 0 step 3 from local memory: 1 of \d+ chunks fail their "
        r"xxh3_64 checksum \(chunk 2\); refusing to load it",
    ):
        ckpt.restore()
    ckpt.close()
    assert_same(victim.state_dict(), before)  # nothing was loaded
    assert agent.store.inventory() == {0: [2]}
    assert '"event":"corrupt_checkpoint"' in (agent.config.run_dir / "events.jsonl").read_text()

    plan = agent.restart()
    assert plan.step == 2
    ckpt = Checkpointer(victim, victim_opt, config=agent.trainer_config())
    assert ckpt.restore() == 2
    ckpt.close()


def test_a_torn_write_is_never_visible(agent: EmbeddedAgent):
    model, optimizer, _scheduler, position = setup()
    ckpt = Checkpointer(model, optimizer, config=agent.trainer_config(chunk_size=4096))
    ckpt.restore()
    for step in range(2):
        train_step(model, optimizer, position)
        ckpt.save(step + 1)
    ckpt.close()
    # A trainer begins step 3, writes garbage into its slot, and dies before committing.
    client = AgentClient(agent.config.socket_path, 5.0)
    client.connect()
    client.request("hello", rank=0, pid=1, generation=agent.generation)
    grant = client.request("begin", rank=0, step=3)
    with open(grant["path"], "r+b") as f:
        f.write(b"\xde\xad" * 4096)
    client.close()
    plan = agent.restart()
    assert plan.step == 2
    model2, optimizer2, *_ = setup()
    ckpt = Checkpointer(model2, optimizer2, config=agent.trainer_config())
    assert ckpt.restore() == 2
    ckpt.close()
    assert_same(model2.state_dict(), model.state_dict())


def test_memory_budget_is_enforced_with_a_clear_error(tmp_path):
    with EmbeddedAgent(memory_limit=1 << 20, run_dir=tmp_path / "r") as agent:
        big = torch.nn.Linear(1024, 1024)
        ckpt = Checkpointer(big, config=agent.trainer_config(snapshot_mode="sync"))
        with pytest.raises(MemoryBudgetError, match="budget is 1.00 MiB"):
            ckpt.save(1)
        ckpt.close()


def test_overlapped_failure_surfaces_at_the_next_optimizer_step(tmp_path):
    with EmbeddedAgent(memory_limit=1 << 20, run_dir=tmp_path / "r") as agent:
        big = torch.nn.Linear(1024, 1024)
        opt = torch.optim.SGD(big.parameters(), lr=0.1)
        ckpt = Checkpointer(big, opt, config=agent.trainer_config())
        ckpt.save(1)
        big(torch.randn(2, 1024)).sum().backward()
        with pytest.raises(MemoryBudgetError):
            opt.step()
        ckpt.close()


def test_steps_must_increase(agent: EmbeddedAgent):
    model, optimizer, *_ = setup()
    with Checkpointer(model, optimizer, config=agent.trainer_config()) as ckpt:
        ckpt.save(5)
        with pytest.raises(SnapshotError, match=r"save\(5\) after save\(5\)"):
            ckpt.save(5)


def test_restore_into_a_different_model_is_refused(agent: EmbeddedAgent):
    model, optimizer, *_ = setup()
    with Checkpointer(model, optimizer, config=agent.trainer_config()) as ckpt:
        ckpt.save(1)
    agent.restart()
    other = torch.nn.Linear(3, 3)
    with (
        Checkpointer(
            other, torch.optim.SGD(other.parameters(), lr=1), config=agent.trainer_config()
        ) as ckpt,
        pytest.raises(RestoreError, match="does not fit this model"),
    ):
        ckpt.restore()


def test_a_trainer_of_another_generation_is_refused(agent: EmbeddedAgent):
    model, optimizer, *_ = setup()
    ckpt = Checkpointer(model, optimizer, config=agent.trainer_config(generation=7))
    with pytest.raises(
        RecoveryError, match="generation 7 arrived while the job is in generation 0"
    ):
        ckpt.start()


def test_ddp_model_and_every_dtype(agent: EmbeddedAgent):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = make_model()
        inner.register_buffer("h16", torch.randn(7).half())
        inner.register_buffer("bf16", torch.randn(7).bfloat16())
        inner.register_buffer("flags", torch.tensor([True, False, True]))
        inner.register_buffer("cplx", torch.randn(3, dtype=torch.complex64))
        inner.register_buffer("counts", torch.arange(5, dtype=torch.int64))
        model = torch.nn.parallel.DistributedDataParallel(inner)
        optimizer = torch.optim.Adam(model.parameters())
        with Checkpointer(model, optimizer, config=agent.trainer_config()) as ckpt:
            train_step(model, optimizer, Position())
            ckpt.save(1)
            expected = copy.deepcopy(model.state_dict())
        agent.restart()
        model2 = torch.nn.parallel.DistributedDataParallel(make_model())
        for name in ("h16", "bf16", "flags", "cplx", "counts"):
            model2.module.register_buffer(name, torch.zeros_like(getattr(inner, name)))
        with Checkpointer(
            model2, torch.optim.Adam(model2.parameters()), config=agent.trainer_config()
        ) as ckpt:
            assert ckpt.restore() == 1
        assert_same(model2.state_dict(), expected)
    finally:
        dist.destroy_process_group()


def test_parameters_no_optimizer_owns_are_captured_at_save_time(agent: EmbeddedAgent):
    model, optimizer, *_ = setup()
    ema = torch.nn.Parameter(torch.full((1 << 20,), 5.0), requires_grad=False)
    model.register_parameter("ema", ema)  # updated by hand, not by the optimizer
    with Checkpointer(model, optimizer, config=agent.trainer_config()) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            ema.fill_(6.0)  # the next iteration changes it while the copy may still run
    agent.restart()
    model2, optimizer2, *_ = setup()
    model2.register_parameter("ema", torch.nn.Parameter(torch.zeros(1 << 20), requires_grad=False))
    with Checkpointer(model2, optimizer2, config=agent.trainer_config()) as ckpt:
        assert ckpt.restore() == 1
    assert torch.equal(model2.ema, torch.full((1 << 20,), 5.0))


def test_without_an_optimizer_everything_is_cloned():
    model = make_model()
    flat = TrainingState(model, []).capture(clone_unstable=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not params & {t.untyped_storage().data_ptr() for t in flat.tensors}


def test_a_begin_left_waiting_from_an_old_generation_cannot_abort_a_new_write(agent: EmbeddedAgent):
    model, optimizer, *_ = setup()
    with Checkpointer(model, optimizer, config=agent.trainer_config()) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    # An old trainer's connection: slots hold {1, 2}; its begin(3) must wait for step 2 to be
    # complete job-wide, which in generation 1 it already is; make it wait on an unmet step.
    old = AgentClient(agent.config.socket_path, 30.0)
    old.connect()
    old.request("hello", rank=0, pid=1, generation=0)
    agent.coordinator._kv.delete("gemini/" + agent.config.job_id + "/gen0/complete/2")
    import threading

    outcome: dict[str, BaseException] = {}

    def stale_begin() -> None:
        try:
            old.request("begin", rank=0, step=3)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    waiter = threading.Thread(target=stale_begin)
    waiter.start()
    agent.restart()  # generation 1 starts while the old begin still waits
    waiter.join(10)
    assert not waiter.is_alive()
    assert isinstance(
        outcome["error"], GeminiError
    )  # told the generation is over, not left waiting
    old.close()  # its disconnect must not touch the new generation's write below
    model2, optimizer2, *_ = setup()
    with Checkpointer(model2, optimizer2, config=agent.trainer_config()) as ckpt:
        assert ckpt.restore() == 2
        ckpt.save(3)
    assert agent.store.inventory() == {0: [2, 3]}
