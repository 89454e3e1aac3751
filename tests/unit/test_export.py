"""`gemini-ckpt export`: a persistent tier written as the persister writes it, exported to DCP and
read back with `dcp.load` into templates, bit for bit; corrupt, missing and refused cases."""

from __future__ import annotations

import json
import random
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from gemini_ckpt.cli.main import main
from gemini_ckpt.errors import ConfigError, CorruptCheckpointError, ExportError
from gemini_ckpt.export.dcp_format import NOTES
from gemini_ckpt.export.exporter import export_step
from gemini_ckpt.export.selection import ExportRequest, select
from gemini_ckpt.snapshot.rng import restore_rng
from gemini_ckpt.store.persistent import PersistentStore
from helpers.persisted import persist_state, training_state

JOB = "job1"


def same(a, b, path="state"):
    """Bitwise tensors, equal NumPy arrays and values of the same types, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: {set(a) ^ set(b)}"
        for key in a:
            same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def load(directory: Path, template):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        dcp.load(template, checkpoint_id=directory, no_dist=True)
    return template


@pytest.fixture
def tier(tmp_path):
    """Two ranks: step 1 on both, step 2 on both, step 3 on rank 0 only (still being written)."""
    store = PersistentStore(tmp_path / "persist", JOB)
    states = {rank: training_state(2 + rank, seed=rank) for rank in (0, 1)}
    for rank in (0, 1):
        persist_state(store, JOB, training_state(1, seed=7), rank=rank, step=1, world_size=2)
        persist_state(store, JOB, states[rank], rank=rank, step=2, world_size=2)
    persist_state(store, JOB, training_state(3, seed=3), rank=0, step=3, world_size=2)
    return store, states


def request(tmp_path, **kwargs) -> ExportRequest:
    return ExportRequest(tmp_path / "persist", JOB, kwargs.pop("out", tmp_path / "out"), **kwargs)


def test_exported_states_load_back_bit_identical_with_optimizer_and_rng(tier, tmp_path):
    _, states = tier
    result = export_step(request(tmp_path))
    assert (result.step, [r.rank for r in result.ranks]) == (2, [0, 1])
    assert result.reason == "step 2 is the newest held by all 2 ranks 0, 1"
    for rank, expected in states.items():
        template = training_state(1, seed=5)
        with pytest.raises(AssertionError):
            same(expected["model"], template["model"])
        same(expected, load(tmp_path / "out" / f"rank-{rank}", template))
        restore_rng(template["rng"])
        drawn = (torch.rand(3), random.random(), float(np.random.rand()))
        restore_rng(expected["rng"])
        assert torch.equal(drawn[0], torch.rand(3))
        assert drawn[1:] == (random.random(), float(np.random.rand()))
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert (record["job"], record["step"], record["world_size"]) == (JOB, 2, 2)
    assert record["notes"] == list(NOTES)
    assert [r["source"] for r in record["ranks"]] == [
        str(tmp_path / "persist" / JOB / "step-000000000002" / f"rank-{r}.safetensors")
        for r in (0, 1)
    ]
    assert Path(record["ranks"][1]["source"]).is_file()
    assert record["ranks"][0]["top_level_keys"] == [
        "model",
        "optimizers",
        "lr_scheduler",
        "extra_state",
        "rng",
    ]
    assert record["ranks"][0]["values_under_non_string_keys"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "persist"]


def test_a_tier_at_an_fsspec_url_exports_like_a_directory(tmp_path):
    url = f"memory://export-test-{uuid.uuid4().hex}"
    state = training_state(1, seed=2)
    persist_state(PersistentStore(url, JOB), JOB, state, rank=0, step=6, world_size=1)
    result = export_step(ExportRequest(url, JOB, tmp_path / "out"))
    assert result.ranks[0].source == f"{url}/{JOB}/step-000000000006/rank-0.safetensors"
    same(state, load(tmp_path / "out" / "rank-0", training_state(1, seed=5)))


def test_odd_values_shared_tensors_and_non_string_keys(tmp_path):
    shared = torch.randn(4, 3)
    state = {
        "model": {"w": shared, "tied": shared, "bf16": torch.randn(5).bfloat16()},
        "extra": {
            "bytes": b"\x00\xffraw",
            "dtype": torch.bfloat16,
            "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
            "scalar": np.float32(1.5),
            "tuple": (1, "a", None, float("inf")),
            "empty": torch.empty(0, 3),
        },
        "optimizers": [{"state": {0: {"momentum_buffer": None, "t": torch.ones(2)}}}],
    }
    persist_state(
        PersistentStore(tmp_path / "persist", JOB), JOB, state, rank=0, step=5, world_size=1
    )
    result = export_step(request(tmp_path))
    assert (result.ranks[0].tensors, result.ranks[0].values) == (5, 6)
    assert result.ranks[0].values_under_non_string_keys == ["optimizers.0.state.0.momentum_buffer"]
    template = {
        "model": {
            "w": torch.zeros(4, 3),
            "tied": torch.zeros(4, 3),
            "bf16": torch.zeros(5).bfloat16(),
        },
        "extra": {"bytes": b"", "dtype": None, "array": None, "scalar": None, "tuple": None},
        "optimizers": [{"state": {0: {"momentum_buffer": 1, "t": torch.zeros(2)}}}],
    }
    template["extra"]["empty"] = torch.zeros(0, 3)
    loaded = load(tmp_path / "out" / "rank-0", template)
    # As NOTES says: tensors load in place; a value under an int key comes back under its string.
    assert loaded["optimizers"][0]["state"].pop("0") == {"momentum_buffer": None}
    loaded["optimizers"][0]["state"][0]["momentum_buffer"] = None
    same(state, loaded)


def test_a_state_dcp_cannot_name_is_an_error_and_leaves_nothing(tmp_path):
    state = {"m": {1: torch.ones(1), "1": torch.zeros(1)}}  # both would be named "m.1"
    persist_state(
        PersistentStore(tmp_path / "persist", JOB), JOB, state, rank=0, step=1, world_size=1
    )
    with pytest.raises(
        ExportError, match="rank 0 step 1: DCP cannot save the state: .*duplicated flatten key m.1"
    ):
        export_step(request(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persist"]


def test_a_flipped_byte_or_a_truncated_file_is_refused_and_nothing_is_written(tier, tmp_path):
    store, _ = tier
    path = tmp_path / "persist" / JOB / "step-000000000002" / "rank-1.safetensors"
    with path.open("r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(
        CorruptCheckpointError, match=r"rank 1 step 2 from .*rank-1\.safetensors: 1 of"
    ):
        export_step(request(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persist"]
    assert store.inventory() == {0: [1, 2, 3], 1: [1, 2]}  # only read: nothing set aside
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        export_step(request(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persist"]
    assert export_step(request(tmp_path, ranks=(0,))).step == 3  # the intact rank alone


INVENTORY = {0: [1, 2, 3], 1: [1, 2], 2: [3]}


@pytest.mark.parametrize(
    ("step", "ranks", "chosen", "reason"),
    [
        (None, (0, 1), (2, (0, 1)), "step 2 is the newest held by all 2 ranks 0, 1"),
        (None, (2, 0), (3, (0, 2)), "step 3 is the newest held by all 2 ranks 0, 2"),
        (None, (0,), (3, (0,)), "step 3 is the newest held by rank 0"),
        (1, (1, 0), (1, (0, 1)), "step 1, as asked, is held by all 2 ranks 0, 1"),
    ],
)
def test_selection_picks_the_newest_common_step_or_the_asked_one(step, ranks, chosen, reason):
    selection = select(INVENTORY, step, ranks)
    assert ((selection.step, selection.ranks), selection.reason) == (chosen, reason)


@pytest.mark.parametrize(
    ("step", "ranks", "message"),
    [
        (None, None, r"no step is held by all 3 ranks 0, 1, 2 \(rank 0 holds step 1, 2, 3; rank 1"),
        (
            3,
            (0, 1),
            r"step 3 is not persisted for rank 1 \(rank 0 holds step 1, 2, 3; rank 1 holds",
        ),
        (None, (0, 5), r"rank 5 has no persisted copy \(ranks with one: 0, 1, 2\)"),
    ],
)
def test_selection_names_what_is_missing(step, ranks, message):
    with pytest.raises(ExportError, match=message):
        select(INVENTORY, step, ranks)


def test_missing_job_step_and_an_incomplete_world_are_errors(tmp_path):
    with pytest.raises(ExportError, match=r"job 'job1' in .*persist: no step is persisted"):
        export_step(request(tmp_path))
    store = PersistentStore(tmp_path / "persist", JOB)
    state = {"w": torch.ones(3)}
    for rank in (0, 1):
        persist_state(store, JOB, state, rank=rank, step=4, world_size=3)
    with pytest.raises(ExportError, match="step 4 of the 3-rank job is incomplete: rank 2 has no"):
        export_step(request(tmp_path))
    with pytest.raises(ExportError, match="step 9 is not persisted for rank 0, 1"):
        export_step(request(tmp_path, step=9))
    assert not (tmp_path / "out").exists()
    assert [r.rank for r in export_step(request(tmp_path, ranks=(1, 0))).ranks] == [0, 1]


def test_a_non_empty_out_needs_force_and_out_may_not_overlap_the_tier(tier, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty; --force replaces it"):
        export_step(request(tmp_path))
    assert (out / "keep.txt").read_text() == "mine"
    export_step(request(tmp_path, force=True))
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "rank-0", "rank-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "persist"]
    for inside in (tmp_path / "persist", tmp_path / "persist" / JOB / "x"):
        with pytest.raises(ConfigError, match="overlaps the persisted job"):
            export_step(request(tmp_path, out=inside, force=True))
    with pytest.raises(ConfigError, match="ranks must be distinct"):
        request(tmp_path, ranks=(1, 1))
    with pytest.raises(ConfigError, match=r"run id '\.\./x' must be"):
        ExportRequest(tmp_path, "../x", tmp_path / "out")


def test_command_line(tier, tmp_path, capsys):
    args = ["export", "--persist-dir", str(tmp_path / "persist"), "--run-id", JOB]
    assert main([*args, "--out", str(tmp_path / "out"), "--ranks", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"job {JOB}: step 2 is the newest held by rank 1; world size 2"
    assert lines[1].startswith(f"rank 1: step 2 -> {tmp_path / 'out' / 'rank-1'} (")
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemini-ckpt: error: the export directory") and "Traceback" not in err
    assert main([*args, "--out", str(tmp_path / "o2"), "--step", "3"]) == 1
    assert "ExportError: job 'job1' in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "o2"), "--ranks", "0,x"])
    assert exit_info.value.code == 2
