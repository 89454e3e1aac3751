"""Shared fixtures: an in-process agent, small models, and a check that no shared memory leaks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.config import shm_root


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[EmbeddedAgent]:
    """A started in-process agent for one rank, with its own run directory."""
    with EmbeddedAgent(run_dir=tmp_path / "run") as a:
        yield a


@pytest.fixture(autouse=True)
def _no_leaked_shared_memory() -> Iterator[None]:
    before = {p.name for p in shm_root().glob("gemini-*")}
    yield
    leaked = {p.name for p in shm_root().glob("gemini-*")} - before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
