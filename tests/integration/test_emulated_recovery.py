"""The emulated workload recovers exactly: a killed trainer, then the same final state as without.

2 machines x 1 rank on loopback; the state is each rank's share of fp32 master weights and two
moments, updated every iteration from the reduced gradients, so a lost, replayed or skipped
iteration would show in the final state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemini_ckpt.demo import emulated, final_state
from helpers.demo_jobs import run_script_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = Path(emulated.__file__)
STEPS = 8


def run_job(run_dir: Path, parallel: str, faults: tuple[str, ...] = ()):
    args = ["--model", "gpt2-10b", "--parallel", parallel, "--scale", "8192"]
    args += ["--compute-ms", "40", "--steps", str(STEPS)]
    args += ["--timings", str(run_dir / "timings"), "--final-state", str(run_dir / "final")]
    return run_script_job(run_dir, SCRIPT, args, faults, machines=2, nproc_per_machine=1)


def timing_steps(run_dir: Path, rank: int) -> list[int]:
    lines = (run_dir / "timings" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.parametrize("parallel", ["zero3", "dp"])
def test_a_killed_emulated_trainer_ends_bit_identical(tmp_path, parallel):
    reference = tmp_path / "reference"
    assert run_job(reference, parallel).summary().recoveries == []
    faulted = tmp_path / "faulted"
    bed = run_job(faulted, parallel, ("kill-worker@step=4,rank=1",))
    (recovery,) = bed.summary().recoveries
    assert recovery.restored_step == 4
    assert final_state.compare_dirs(reference / "final", faulted / "final", 2) == []
    # The state did move: the master weights differ from their initial values.
    state = final_state.torch.load(reference / "final" / "rank0.pt", weights_only=True)
    assert not final_state.torch.equal(
        state["model"]["master"], emulated.ShardState(state["model"]["master"].numel()).master
    )
    # The killed rank ran steps 1-4, then (restored at 4) 5..STEPS; iteration 5 may have started.
    assert timing_steps(reference, 1) == list(range(1, STEPS + 1))
    assert timing_steps(faulted, 1)[-STEPS + 4 :] == list(range(5, STEPS + 1))
