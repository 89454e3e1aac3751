"""Test-bed jobs of the demo GPT that must succeed: the shared setup of the recovery tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gemini_ckpt.demo import train_gpt
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

SCRIPT = Path(train_gpt.__file__)


def run_demo_job(
    run_dir: Path,
    model: tuple[int, int, int],
    faults: tuple[str, ...] = (),
    **spec: object,
) -> LocalTestbed:
    """Train the demo GPT (`model` = steps, d_model, layers; batch 4) to the end on the test bed.

    Its final state lands in `run_dir/final`; `spec` sets or overrides `LocalSpec` fields (the
    persistent tier every 4 steps and a 2 s lease are the defaults). Fails the test, with the
    agents' logs, unless the job succeeds. `script=` runs another script taking the same
    arguments (the FSDP2 example); `extra_args=` appends to them.
    """
    script = Path(str(spec.pop("script", SCRIPT)))
    args = model_args(run_dir, model) + tuple(spec.pop("extra_args", ()))  # type: ignore[call-overload]
    return run_script_job(run_dir, script, args, faults, **spec)


def model_args(run_dir: Path, model: tuple[int, int, int]) -> tuple[str, ...]:
    """The demo GPT's arguments: `model` = steps, d_model, layers; batch 4; final state kept."""
    steps, d_model, layers = model
    args = ["--steps", str(steps), "--d-model", str(d_model), "--layers", str(layers)]
    args += ["--batch", "4", "--seq", str(d_model // 2), "--final-state", str(run_dir / "final")]
    return tuple(args)


def run_script_job(
    run_dir: Path,
    script: Path,
    args: Sequence[str],
    faults: tuple[str, ...] = (),
    timeout_s: float = 300,
    **spec: object,
) -> LocalTestbed:
    """Run `script args` to the end on the test bed, with `run_demo_job`'s defaults."""
    fields: dict[str, object] = dict(
        script=script,
        script_args=tuple(args),
        faults=faults,
        run_dir=run_dir,
        max_restarts=3,
        member_ttl_s=2,
        persist_dir=run_dir / "ckpt",
        persist_every=4,
    )
    fields.update(spec)
    with LocalTestbed(LocalSpec(**fields)) as bed:  # type: ignore[arg-type]
        code = bed.wait(timeout_s)
    machines = int(fields.get("machines", 1))  # type: ignore[call-overload]
    assert code == 0, "\n".join(bed.agent_log(m)[-3000:] for m in range(machines))
    return bed


def newest_common_step(bed: LocalTestbed, machines: int) -> int:
    """The newest step every machine committed for all its ranks in generation 0.

    A trainer killed right after committing step s leaves the other ranks' saves of s racing the
    agent that stops them: on a busy host one can lose, and s - 1 is then what every rank holds.
    """
    records = read_events(bed.event_files())
    progress = [e for e in records if e["event"] == ev.PROGRESS and e["generation"] == 0]
    return min(max(e["step"] for e in progress if e["machine"] == m) for m in range(machines))
