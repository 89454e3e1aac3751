"""Shared fixtures: an in-process agent, small models, and a check that no shared memory leaks."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Checkpoint memory of this test session (and of the agents it starts) goes into a directory of its
# own, so a leak check never sees another session's segments.
SHM_ROOT = Path("/dev/shm") / f"gemini-tests-{os.getpid()}"
os.environ["GEMINI_SHM_DIR"] = str(SHM_ROOT)

from gemini_ckpt.agent.embedded import EmbeddedAgent  # noqa: E402
from gemini_ckpt.config import shm_root  # noqa: E402


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[EmbeddedAgent]:
    """A started in-process agent for one rank, with its own run directory."""
    with EmbeddedAgent(run_dir=tmp_path / "run") as a:
        yield a


@pytest.fixture(scope="session", autouse=True)
def _session_shm_root() -> Iterator[None]:
    SHM_ROOT.mkdir(parents=True, exist_ok=True)
    yield
    shutil.rmtree(SHM_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leaked_shared_memory() -> Iterator[None]:
    assert shm_root() == SHM_ROOT
    before = {p.name for p in SHM_ROOT.iterdir()}
    yield
    leaked = {p.name for p in SHM_ROOT.iterdir()} - before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
