"""FSDP2 (`fully_shard`) jobs on the test bed: 2 machines x 2 ranks, each rank holding shards.

The example `examples/fsdp2_gpt/train.py` trains; a trainer is killed, or a whole machine (its
ranks come back from the peer's replica, m = 2). Both runs must end bit-identical, shard by
shard, to an uninterrupted one, with the restore source of every rank as planned.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.demo import final_state
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.recovery.plan import LOCAL_MEMORY, peer_source
from gemini_ckpt.testbed.local import LocalTestbed
from helpers.demo_jobs import newest_common_step, run_demo_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_gpt" / "train.py"
STEPS = 10
WORLD = 4


def run_job(run_dir: Path, faults: tuple[str, ...] = ()) -> LocalTestbed:
    return run_demo_job(
        run_dir,
        (STEPS, 32, 1),
        faults,
        script=EXAMPLE,
        machines=2,
        nproc_per_machine=2,
        replicas=2,
        persist_dir=None,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    assert run_job(run_dir).summary().recoveries == []
    return run_dir / "final"


def restored_sources(bed: LocalTestbed) -> dict[int, str]:
    """Per rank, where its trainer reported loading the state from (the agents' events)."""
    records = read_events(bed.event_files())
    return {e["rank"]: e["source"] for e in records if e["event"] == ev.RESTORED}


def test_killed_fsdp2_trainer_resumes_bit_identically_from_local_memory(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-worker@step=5,rank=1",))
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "software failure"
    assert recovery.restored_step == newest_common_step(bed, 2) in (4, 5)
    assert recovery.sources == dict.fromkeys(range(WORLD), LOCAL_MEMORY)
    assert restored_sources(bed) == dict.fromkeys(range(WORLD), LOCAL_MEMORY)
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []


def test_lost_fsdp2_machine_restores_its_shards_from_the_peer(tmp_path, reference):
    bed = run_job(tmp_path, ("kill-machine@step=5,machine=1",))
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 5  # at most the iteration in progress is lost
    expected = {0: LOCAL_MEMORY, 1: LOCAL_MEMORY, 2: peer_source(0), 3: peer_source(0)}
    assert recovery.sources == expected
    assert restored_sources(bed) == expected
    assert final_state.compare_dirs(reference, tmp_path / "final", WORLD) == []
