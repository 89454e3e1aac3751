"""Agent configurations for unit tests that need one but start no agent."""

from __future__ import annotations

from pathlib import Path

from gemini_ckpt.config import AgentConfig


def agent_config(run_dir: Path, machines: int = 2, **fields: object) -> AgentConfig:
    """Machine 0 of a job of `machines` x 1 rank named "job", with `fields` overridden."""
    defaults: dict[str, object] = dict(
        job_id="job",
        machine=0,
        machines=machines,
        nproc_per_machine=1,
        command=("train.py",),
        store_addr="",
        store_port=0,
        host_store=False,
        run_dir=run_dir,
        shm_dir=run_dir / "shm",
        memory_limit=1 << 20,
    )
    return AgentConfig(**{**defaults, **fields})  # type: ignore[arg-type]
