import json

import pytest

from gemini_ckpt.errors import CorruptCheckpointError, MemoryBudgetError, StoreError
from gemini_ckpt.protocol.manifest import Manifest, TensorEntry
from gemini_ckpt.store.budget import MemoryBudget
from gemini_ckpt.store.local_store import LocalStore
from gemini_ckpt.store.slots import RankSlots, WriteGrant


def manifest(step, rank=0, nbytes=64):
    return Manifest(
        job="j",
        rank=rank,
        world_size=2,
        step=step,
        generation=0,
        chunk_size=64,
        data_nbytes=nbytes,
        chunk_digests=("0" * 16,) * (-(-nbytes // 64)),
        entries=(TensorEntry("uint8", (nbytes,), 0, nbytes),),
        tensor_refs=(0,),
        skeleton={"__tensor__": 0},
    )


def test_writes_alternate_and_keep_the_newest_complete_step():
    slots = RankSlots(0)
    assert slots.grant(1) == WriteGrant(0, 1, None, None)
    slots.begin(slots.grant(1))
    slots.commit(0, manifest(1))
    grant = slots.grant(2)
    assert grant == WriteGrant(1, 2, None, 1)
    slots.begin(grant)
    slots.commit(1, manifest(2))
    grant = slots.grant(3)
    assert grant == WriteGrant(0, 3, 1, 2)  # overwrite step 1, keep step 2
    slots.begin(grant)
    assert slots.committed_steps() == [2]  # step 1 is gone the moment writing starts
    assert slots.abort_writing() == 3
    assert slots.committed_steps() == [2]


def test_steps_must_increase_and_one_write_at_a_time():
    slots = RankSlots(0)
    slots.begin(slots.grant(5))
    with pytest.raises(StoreError, match="already writing step 5"):
        slots.grant(6)
    slots.commit(0, manifest(5))
    with pytest.raises(StoreError, match="steps must increase"):
        slots.grant(5)
    with pytest.raises(StoreError, match="not being written"):
        slots.commit(1, manifest(6))


def test_truncate_forgets_an_abandoned_timeline(tmp_path):
    store = LocalStore(tmp_path / "shm", budget=64 << 20)
    store.start()
    try:
        store.allocate(0, 128)
        for step, slot in ((1, 0), (2, 1)):
            store.begin_write(0, store.prepare_write(0, step))
            store.commit(0, slot, manifest(step))
        assert store.truncate_after(1) == {0: [2]}
        assert store.inventory() == {0: [1]}
        assert store.prepare_write(0, 2).slot == 1
    finally:
        store.close()


def test_store_budget_error_says_what_does_not_fit(tmp_path):
    store = LocalStore(tmp_path / "shm", budget=5 << 20)
    store.start()
    try:
        assert store.allocate(0, 1 << 20) == 1 << 20
        with pytest.raises(
            MemoryBudgetError, match=r"rank 1 needs 2 slots of 2\.00 MiB.*budget is 5\.00 MiB"
        ):
            store.allocate(1, 2 << 20)
        assert store.usage().reserved == 2 << 20
    finally:
        store.close()
    assert not (tmp_path / "shm").exists()


def test_own_slots_and_replicas_share_one_budget(tmp_path):
    budget = MemoryBudget(7 << 20)
    own = LocalStore(tmp_path / "own", budget)
    replicas = LocalStore(tmp_path / "replicas", budget, kind="replica")
    own.start()
    replicas.start()
    try:
        own.allocate(0, 1 << 20)
        replicas.allocate(1, 1 << 20)
        assert own.usage().reserved == replicas.usage().reserved == 4 << 20
        with pytest.raises(
            MemoryBudgetError,
            match=r"the replica of rank 2 needs 2 slots of 2\.00 MiB; .* budget is 7\.00 MiB and "
            r"4\.00 MiB \(2\.00 MiB own, 2\.00 MiB replicas\) is already held",
        ):
            replicas.allocate(2, 2 << 20)
        # growing a holder replaces its reservation instead of adding to it
        own.allocate(0, 2 << 20)
        assert budget.held() == {"own rank 0": 4 << 20, "replica rank 1": 2 << 20}
    finally:
        own.close()
        replicas.close()
    assert budget.reserved() == 0


def test_a_replication_factor_that_cannot_fit_is_refused_when_slots_are_first_sized(tmp_path):
    store = LocalStore(tmp_path / "shm", MemoryBudget(8 << 20, copies=3))
    store.start()
    try:
        store.allocate(0, 1 << 20)  # 2 MiB own, 6 MiB with two peers' copies
        with pytest.raises(
            MemoryBudgetError,
            match=r"with --replicas 3 this machine also holds 2 peer copies of about as much: "
            r"12\.00 MiB in all, over its checkpoint memory budget of 8\.00 MiB",
        ):
            store.allocate(1, 1 << 20)
    finally:
        store.close()


def test_a_slot_changes_epoch_when_a_write_begins_so_a_lock_free_reader_sees_it(tmp_path):
    store = LocalStore(tmp_path / "shm", budget=64 << 20)
    store.start()
    try:
        store.allocate(0, 128)
        for step, slot in ((1, 0), (2, 1)):
            store.begin_write(0, store.prepare_write(0, step))
            store.commit(0, slot, manifest(step))
        ref = store.locate(0, 1)
        assert store.unchanged(ref)
        store.begin_write(0, store.prepare_write(0, 3))  # reuses step 1's slot
        assert not store.unchanged(ref)
        newest = store.locate(0, 2)
        store.drop(0, 2)
        assert not store.unchanged(newest)
    finally:
        store.close()


def test_store_commit_writes_the_manifest_last_and_begin_removes_it(tmp_path):
    store = LocalStore(tmp_path / "shm", budget=64 << 20)
    store.start()
    try:
        store.allocate(0, 128)
        grant = store.prepare_write(0, 1)
        store.begin_write(0, grant)
        manifest_file = tmp_path / "shm" / "r0.s0.manifest.json"
        assert not manifest_file.exists()
        store.commit(0, 0, manifest(1))
        assert json.loads(manifest_file.read_text())["step"] == 1
        assert store.locate(0, 1).slot == 0
        # a second write goes to the other slot; the third overwrites slot 0 and hides it first
        store.begin_write(0, store.prepare_write(0, 2))
        store.commit(0, 1, manifest(2))
        store.begin_write(0, store.prepare_write(0, 3))
        assert not manifest_file.exists()
        assert store.inventory() == {0: [2]}
        with pytest.raises(CorruptCheckpointError, match="exceeds the slot"):
            store.commit(0, 0, manifest(3, nbytes=4 << 20))
        with pytest.raises(StoreError, match="manifest of rank 1 sent for rank 0"):
            store.commit(0, 0, manifest(3, rank=1))
        store.commit(0, 0, manifest(3))
        assert store.inventory() == {0: [2, 3]}
        assert store.drop(0, 3) and store.inventory() == {0: [2]}
    finally:
        store.close()


def test_write_before_allocation_is_refused(tmp_path):
    store = LocalStore(tmp_path / "shm", budget=1 << 20)
    store.start()
    try:
        with pytest.raises(StoreError, match="allocate before saving"):
            store.prepare_write(0, 1)
    finally:
        store.close()


def test_a_step_some_rank_skipped_is_given_up_instead_of_the_older_one():
    slots = RankSlots(0)
    for step, slot in ((4, 0), (5, 1)):
        slots.begin(slots.grant(step))
        slots.commit(slot, manifest(step))
    assert slots.grant(6) == WriteGrant(0, 6, 4, 5)  # normally: reuse the older slot
    grant = slots.grant(6, give_up=5)
    assert grant == WriteGrant(1, 6, 5, 4, True)  # step 5 can never be common: keep step 4
    slots.begin(grant)
    assert slots.committed_steps() == [4]
