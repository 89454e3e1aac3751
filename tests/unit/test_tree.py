from collections import OrderedDict

import numpy as np
import pytest
import torch

from gemini_ckpt.errors import CorruptCheckpointError, SnapshotError
from gemini_ckpt.snapshot.tree import flatten, unflatten
from helpers.models import assert_same


def roundtrip(value):
    flat = flatten(value)
    import json

    skeleton = json.loads(json.dumps(flat.skeleton, allow_nan=False))
    return unflatten(skeleton, [t.clone() for t in flat.tensors])


def test_plain_data_survives_json_exactly():
    value = {
        "ints": [1, -2, 2**70],
        "floats": (0.1, float("inf"), float("-inf")),
        "none": None,
        "flag": True,
        "text": "ünïcode",
        "raw": b"\x00\xff",
        3: "int key",
        (1, 2): "tuple key",
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
    }
    out = roundtrip(value)
    assert out == value
    assert isinstance(out["floats"], tuple)
    assert isinstance(out["size"], torch.Size)


def test_nan_roundtrips():
    out = roundtrip({"x": float("nan")})
    assert out["x"] != out["x"]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.uint8,
    ],
)
def test_tensors_of_any_dtype(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    out = roundtrip({"t": t, "scalar": torch.tensor(7, dtype=dtype)})
    assert_same(out["t"], t)
    assert out["scalar"].shape == ()


def test_optimizer_state_with_int_keys_and_nested_dicts():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    out = roundtrip(state)
    assert_same(out, state)
    assert isinstance(out["param_groups"][0]["betas"], tuple)


def test_ordered_dict_keeps_module_metadata():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    out = roundtrip(sd)
    assert isinstance(out, OrderedDict)
    assert out._metadata == sd._metadata
    torch.nn.BatchNorm1d(3).load_state_dict(out)


def test_numpy_arrays_and_scalars():
    state = np.random.RandomState(5).get_state()
    value = {
        "np": state,
        "f": np.float32(1.5),
        "i": np.int64(-3),
        "u32": np.arange(5, dtype=np.uint32),
    }
    out = roundtrip(value)
    assert out["np"][0] == "MT19937"
    np.testing.assert_array_equal(out["np"][1], state[1])
    assert out["np"][1].dtype == state[1].dtype
    assert out["f"] == np.float32(1.5) and type(out["f"]) is np.float32
    assert out["u32"].dtype == np.uint32


def test_unsupported_value_names_its_path():
    with pytest.raises(SnapshotError, match=r"builtins\.function at state\['extra'\]\['fn'\]"):
        flatten({"extra": {"fn": lambda: 0}})


def test_sparse_and_meta_tensors_are_refused():
    with pytest.raises(SnapshotError, match="sparse"):
        flatten({"s": torch.eye(3).to_sparse()})
    with pytest.raises(SnapshotError, match="meta"):
        flatten({"m": torch.empty(3, device="meta")})


def test_shared_tensor_is_referenced_twice():
    w = torch.randn(4)
    flat = flatten({"a": w, "b": w})
    assert len(flat.tensors) == 2
    assert flat.tensors[0].data_ptr() == flat.tensors[1].data_ptr()


@pytest.mark.parametrize(
    "skeleton",
    [
        {"__tensor__": 5},
        {"__weird__": 1},
        {"__dtype__": "not_a_dtype"},
        {"a": 1, "b": 2},
        {"__dict__": [[{"__dict__": []}, 1]]},
    ],
)
def test_malformed_skeleton_is_a_corrupt_checkpoint(skeleton):
    with pytest.raises(CorruptCheckpointError):
        unflatten(skeleton, [])
