"""The DeepSpeed integration's refusals, without starting an engine."""

from types import SimpleNamespace

import pytest

from gemini_ckpt.errors import ExportError, RestoreError, SnapshotError
from gemini_ckpt.export.selection import ExportRequest
from gemini_ckpt.integrations.deepspeed import zero
from gemini_ckpt.integrations.deepspeed.layout import export_deepspeed, rank_files
from gemini_ckpt.integrations.deepspeed.state import FORMAT, DeepSpeedState


def test_engines_without_a_zero_optimizer_are_refused():
    engine = SimpleNamespace(optimizer=object(), zero_optimization_stage=lambda: 0)
    with pytest.raises(SnapshotError, match="ZeRO stages 1-3.*stage 0 and optimizer object"):
        zero.find_partitions(engine)


def test_a_state_saved_by_the_core_checkpointer_is_not_loaded_into_an_engine():
    state = DeepSpeedState(engine=None)
    state._parts = SimpleNamespace(stage=3, dp_rank=0, dp_world=2)  # type: ignore[assignment]
    with pytest.raises(RestoreError, match="not hold a DeepSpeed rank's state"):
        state.load({"model": {}, "optimizers": []})
    tree = {"format": FORMAT, "zero_stage": 3, "dp_rank": 1, "dp_world": 4}
    with pytest.raises(RestoreError, match="rank 1 of 4; this engine is stage 3, rank 0 of 2"):
        state.load(tree)


def test_only_zero3_states_export_to_deepspeed_layout(tmp_path):
    with pytest.raises(ExportError, match="ZeRO stage 2; exporting .* supports stage 3"):
        rank_files({"format": FORMAT, "zero_stage": 2}, step=4)
    with pytest.raises(ExportError, match="not saved by DeepSpeedCheckpointer"):
        rank_files({"model": {}}, step=4)
    request = ExportRequest(tmp_path / "ckpt", "job", tmp_path / "out", ranks=(0,))
    with pytest.raises(ExportError, match="needs every rank"):
        export_deepspeed(request)
