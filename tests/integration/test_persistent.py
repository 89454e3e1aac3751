"""The persistent tier's format and guarantees, on checkpoints made by a real Checkpointer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemini_ckpt import Checkpointer
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.errors import CorruptCheckpointError, StoreError
from gemini_ckpt.snapshot.copier import ChunkCopier
from gemini_ckpt.store.persistent import PersistentStore
from gemini_ckpt.store.shm import map_file
from helpers.models import Position, make_model, train_step


def checkpoint_steps(agent: EmbeddedAgent, steps: int):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with Checkpointer(
        model, optimizer, extra_state=Position(), config=agent.trainer_config(chunk_size=4096)
    ) as ckpt:
        position = Position()
        for step in range(steps):
            train_step(model, optimizer, position)
            ckpt.save(step + 1)
    return model, optimizer


def persist(agent: EmbeddedAgent, store: PersistentStore, step: int):
    ref = agent.store.locate(0, step)
    region = map_file(ref.path, ref.manifest.data_nbytes, writable=False)
    try:
        return Path(store.write(ref.manifest, region.view())), ref.manifest
    finally:
        region.close()


@pytest.fixture(params=["directory", "fsspec-file-url"])
def location(request, tmp_path):
    """The same on-disk place, reached directly and through fsspec (the path every URL takes)."""
    if request.param == "directory":
        return tmp_path / "ckpt"
    return f"file://{tmp_path}/ckpt"


def test_written_file_is_standard_safetensors_with_named_tensors(agent, location):
    model, optimizer = checkpoint_steps(agent, 2)
    store = PersistentStore(location, agent.config.job_id)
    path, _ = persist(agent, store, 2)
    tensors = load_file(str(path))
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[f"model.{name}"], value), name
    exp_avg = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert torch.equal(tensors["optimizers.0.state.0.exp_avg"], exp_avg)
    assert store.inventory() == {0: [2]}


def test_read_back_verifies_and_truncation_is_caught(agent, location):
    checkpoint_steps(agent, 1)
    store = PersistentStore(location, agent.config.job_id)
    path, manifest = persist(agent, store, 1)
    buffer = bytearray(manifest.data_nbytes)
    loaded = store.read_into(0, 1, memoryview(buffer))
    assert loaded == manifest
    copier = ChunkCopier(2)
    try:
        assert copier.verify(manifest.chunk_digests, manifest.chunk_size, memoryview(buffer)) == []
        with path.open("r+b") as f:  # one flipped bit on disk: the checksum catches it
            f.seek(-100, 2)
            byte = f.read(1)
            f.seek(-100, 2)
            f.write(bytes([byte[0] ^ 0x10]))
        store.read_into(0, 1, memoryview(buffer))
        assert copier.verify(manifest.chunk_digests, manifest.chunk_size, memoryview(buffer)) == [
            manifest.num_chunks - 1
        ]
    finally:
        copier.close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        store.read_into(0, 1, memoryview(buffer))
    with pytest.raises(StoreError, match="no persisted copy of rank 0 step 7"):
        store.read_into(0, 7, memoryview(buffer))


def test_a_copy_without_its_manifest_does_not_exist_and_old_steps_are_collected(agent, location):
    checkpoint_steps(agent, 4)
    store = PersistentStore(location, agent.config.job_id, keep=1)
    persist(agent, store, 3)
    persist(agent, store, 4)
    (Path(store.step_dir(4)) / "rank-0.manifest.json").unlink()  # as if the writer died before it
    assert store.inventory() == {0: [3]}
    assert store.collect() == []  # step 3 is the only complete one; step 4 may be in progress
    persist(agent, store, 4)
    assert store.collect() == [3]
    assert store.inventory() == {0: [4]}
    assert not list(Path(store.step_dir(4)).glob(".*tmp*"))


def test_manifest_of_another_step_is_refused(agent, location):
    checkpoint_steps(agent, 2)
    store = PersistentStore(location, agent.config.job_id)
    persist(agent, store, 1)
    persist(agent, store, 2)
    (Path(store.step_dir(2)) / "rank-0.manifest.json").write_bytes(
        (Path(store.step_dir(1)) / "rank-0.manifest.json").read_bytes()
    )
    with pytest.raises(CorruptCheckpointError, match="holds rank 0 step 1, not rank 0 step 2"):
        store.read_manifest(0, 2)


def test_an_object_store_url_round_trips_without_renaming_the_data(agent):
    """memory:// stands in for s3:// and the like: no directories, no atomic rename."""
    checkpoint_steps(agent, 3)
    url = f"memory://gemini-test-{uuid.uuid4().hex}"
    store = PersistentStore(url, agent.config.job_id, keep=1)
    assert store.location == f"{url}/{agent.config.job_id}"
    for step in (2, 3):
        ref = agent.store.locate(0, step)
        region = map_file(ref.path, ref.manifest.data_nbytes, writable=False)
        try:
            store.write(ref.manifest, region.view())
            expected = bytes(region.view()[: ref.manifest.data_nbytes])
        finally:
            region.close()
    assert store.collect() == [2]
    assert store.inventory() == {0: [3]}
    buffer = bytearray(len(expected))
    assert store.read_into(0, 3, memoryview(buffer)).step == 3
    assert bytes(buffer) == expected
    store.mark_bad(0, 3)
    assert store.inventory() == {}
    with pytest.raises(StoreError, match=f"no persisted copy of rank 0 step 3 in {url}"):
        store.read_manifest(0, 3)


def test_an_unknown_or_uninstalled_url_protocol_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot use 'bogus://x' as the persistent tier"):
        PersistentStore("bogus://x", "job")
