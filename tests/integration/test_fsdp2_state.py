"""A fully sharded (FSDP2) model's state through a real Checkpointer: 2 ranks on gloo.

Each rank snapshots only its shards (the stored bytes are its partition, not the full tensors),
restores them bit for bit into a freshly sharded model in place, and refuses, naming the
parameter, to restore into a different sharding.
"""

from __future__ import annotations

import multiprocessing

import pytest

from helpers import fsdp2_ranks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SMALL_STATE_BYTES = 64 << 10
"""Room for what is not sharded: RNG states, AdamW's step counters."""


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("fsdp2-state")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=fsdp2_ranks.run_rank, args=(r, str(tmp / "init"), str(tmp), results), daemon=True
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=150) for _ in procs)
    for p in procs:
        p.join(30)
    for rank, report in got.items():
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
    return got


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_stores_its_partition_only(reports, rank):
    report = reports[rank]
    assert 0 < report["local_bytes"] < report["full_bytes"]
    assert report["local_bytes"] <= report["stored_bytes"]
    assert report["stored_bytes"] <= report["local_bytes"] + SMALL_STATE_BYTES
    assert report["stored_bytes"] < report["full_bytes"]


@pytest.mark.parametrize("rank", [0, 1])
def test_restore_loads_each_shard_bit_identically_in_place(reports, rank):
    report = reports[rank]
    assert report["restored_step"] == fsdp2_ranks.SAVED_STEPS
    assert report["difference"] is None
    assert report["in_place"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_different_sharding_is_refused_naming_the_parameter(reports, rank):
    other = reports[rank]["other_world_size"]
    assert other.startswith("model['tok.weight'] was saved as shape [16, 64]")
    assert "ranks [0, 1]" in other and f"ranks [{rank}]" in other
    assert "the world size, mesh and placements must be the same" in other
    unsharded = reports[rank]["unsharded"]
    assert unsharded.startswith("model['tok.weight'] was saved as a shard")
    assert "unsharded tensor of shape [16, 64]" in unsharded
