"""DeepSpeed ZeRO jobs on the test bed: 2 machines x 2 ranks on gloo, real SIGKILLs.

Each stage's uninterrupted run is the reference; a run with a trainer killed (every stage; ZeRO-2
with the optimizer offloaded) or a machine lost (ZeRO-3, m = 2 replicas) must end bit-identical to
it, every rank restored from the expected source. A persisted ZeRO-3 step exported to DeepSpeed's
own layout must load with `engine.load_checkpoint` and continue to the same final state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gemini_ckpt.cli.main import main as cli
from gemini_ckpt.config import use_torch_extensions_dir
from gemini_ckpt.demo import final_state
from gemini_ckpt.recovery.plan import LOCAL_MEMORY, peer_source
from gemini_ckpt.testbed.local import LocalTestbed
from helpers.demo_jobs import newest_common_step, run_script_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).parents[2] / "examples" / "deepspeed_gpt" / "train.py"
STEPS = 8
WORLD = 4
SHM = Path("/dev/shm")

use_torch_extensions_dir()  # agents and trainers inherit it: DeepSpeed's ops compile once


def run_job(
    run_dir: Path, stage: int, faults: tuple[str, ...] = (), *extra: str, **spec: object
) -> LocalTestbed:
    args = ("--zero-stage", str(stage), "--steps", str(STEPS), "--d-model", "32", "--layers", "1")
    args += ("--batch", "4", "--seq", "16", "--final-state", str(run_dir / "final"), *extra)
    fields: dict[str, object] = dict(machines=2, nproc_per_machine=2, replicas=2)
    return run_script_job(run_dir, EXAMPLE, args, faults, 600, **{**fields, **spec})


@pytest.fixture(scope="module", autouse=True)
def _no_deepspeed_shm_leftovers() -> Iterator[None]:
    # DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_* files behind.
    before = set(SHM.glob("deepspeed_*"))
    yield
    for path in set(SHM.glob("deepspeed_*")) - before:
        path.unlink(missing_ok=True)


def reference_run(tmp_path_factory: pytest.TempPathFactory, stage: int, *extra: str) -> Path:
    run_dir = tmp_path_factory.mktemp(f"zero{stage}-reference")
    assert run_job(run_dir, stage, (), *extra).summary().recoveries == []
    return run_dir


@pytest.fixture(scope="module")
def zero3_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory, 3)


def assert_same_final(reference: Path, run_dir: Path) -> None:
    assert final_state.compare_dirs(reference / "final", run_dir / "final", WORLD) == []


# ZeRO-2 runs with the optimizer offloaded (DeepSpeedCPUAdam, whose C++ step state a restore must
# replay to stay exact); ZeRO-1 and ZeRO-3 with a torch optimizer.
@pytest.mark.parametrize(("stage", "extra"), [(1, ()), (2, ("--offload",))], ids=["1", "2-offload"])
def test_zero_1_and_2_resume_a_killed_trainer_from_local_memory(
    tmp_path, tmp_path_factory, stage, extra
):
    reference = reference_run(tmp_path_factory, stage, *extra)
    bed = run_job(tmp_path, stage, ("kill-worker@step=5,rank=1",), *extra)
    (recovery,) = bed.summary().recoveries
    assert recovery.restored_step == newest_common_step(bed, 2) in (4, 5)
    assert recovery.sources == dict.fromkeys(range(WORLD), LOCAL_MEMORY)
    assert_same_final(reference, tmp_path)


def test_zero3_resumes_a_killed_trainer_from_local_memory(tmp_path, zero3_reference):
    bed = run_job(tmp_path, 3, ("kill-worker@step=5,rank=3",))
    (recovery,) = bed.summary().recoveries
    assert any("rank 3" in f and "SIGKILL" in f for f in recovery.failures)
    assert recovery.restored_step == newest_common_step(bed, 2) in (4, 5)
    assert recovery.sources == dict.fromkeys(range(WORLD), LOCAL_MEMORY)
    assert_same_final(zero3_reference, tmp_path)


def test_zero3_restores_a_lost_machines_ranks_from_its_peer(tmp_path, zero3_reference):
    bed = run_job(tmp_path, 3, ("kill-machine@step=5,machine=1",))
    (recovery,) = bed.summary().recoveries
    assert recovery.kind == "machine failure"
    assert recovery.restored_step == 5
    assert recovery.sources == {
        0: LOCAL_MEMORY,
        1: LOCAL_MEMORY,
        2: peer_source(0),
        3: peer_source(0),
    }
    assert_same_final(zero3_reference, tmp_path)


def test_a_zero3_step_exported_to_deepspeed_layout_continues_bit_identically(
    tmp_path, zero3_reference
):
    exported = tmp_path / "exported"
    job = next((zero3_reference / "ckpt").iterdir()).name
    argv = ["export", "--format", "deepspeed", "--persist-dir", str(zero3_reference / "ckpt")]
    assert cli([*argv, "--run-id", job, "--step", "4", "--out", str(exported)]) == 0
    assert (exported / "latest").read_text() == "global_step4"
    names = sorted(p.name for p in (exported / "global_step4").iterdir())
    assert names == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
        for r in range(WORLD)
        for kind in ("model", "optim")
    ]
    run_dir = tmp_path / "resumed"
    bed = run_job(run_dir, 3, (), "--load-deepspeed", str(exported))
    assert bed.summary().recoveries == []
    logs = "".join(p.read_text() for p in run_dir.glob("m*/logs/*/attempt_0/*/stdout.log"))
    assert logs.count(f"starting at step 4 (DeepSpeed checkpoint {exported})") == WORLD
    assert_same_final(zero3_reference, run_dir)
