import json
import socket

import pytest

from gemini_ckpt.errors import CorruptCheckpointError, ProtocolError
from gemini_ckpt.protocol.framing import FramingBroken, encode_frame, recv_frame
from gemini_ckpt.protocol.manifest import Manifest, TensorEntry
from gemini_ckpt.protocol.messages import parse_request


def manifest(**overrides):
    fields = dict(
        job="j",
        rank=0,
        world_size=2,
        step=3,
        generation=0,
        chunk_size=128,
        data_nbytes=256,
        chunk_digests=("a" * 16, "b" * 16),
        entries=(TensorEntry("float32", (8, 8), 0, 256),),
        tensor_refs=(0,),
        skeleton={"__tensor__": 0},
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_manifest_roundtrip():
    m = manifest()
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chunk_digests": ("a",)}, "1 chunk digests for 2 chunks"),
        ({"entries": (TensorEntry("float32", (8, 8), 64, 256),)}, "lies outside"),
        ({"entries": (TensorEntry("float32", (1,), 3, 4),)}, "has offset 3 and size 4"),
        ({"entries": (TensorEntry("float32", (1,), -64, 4),)}, "has offset -64"),
        (
            {
                "entries": (
                    TensorEntry("float32", (8, 8), 0, 256),
                    TensorEntry("float32", (2,), 128, 8),
                ),
                "tensor_refs": (0, 1),
            },
            "overlaps another",
        ),
        (
            {"entries": (TensorEntry("float32", (8, 9), 0, 256),)},
            r"shape \[8, 9\] of float32 is not 256",
        ),
        ({"entries": (TensorEntry("float99", (8, 8), 0, 256),)}, "unknown dtype 'float99'"),
        ({"tensor_refs": (1,)}, "past the entry table"),
        ({"format": "other/9"}, "format"),
        ({"rank": 5}, "out of range"),
    ],
)
def test_inconsistent_manifests_are_refused(overrides, message):
    with pytest.raises(CorruptCheckpointError, match=message):
        Manifest.from_json(manifest(**overrides).to_json())


def test_manifest_larger_than_slot_is_refused():
    with pytest.raises(CorruptCheckpointError, match="exceeds the slot"):
        manifest().validate(capacity=100)


@pytest.mark.parametrize("text", ["{", "[]", '{"rank": 0}', '{"job": 1, "rank": "0"}'])
def test_malformed_manifest_json(text):
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(text)


def test_frames_roundtrip_and_reject_garbage():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame({"op": "stats", "id": 1}))
        assert recv_frame(b) == {"op": "stats", "id": 1}
        a.sendall(b"\x00\x00\x00\x03[1]")
        with pytest.raises(ProtocolError, match="JSON object"):
            recv_frame(b)
        a.sendall(b"\x00\x00\x00\x02\xff\xfe")
        with pytest.raises(ProtocolError, match="UTF-8 JSON"):
            recv_frame(b)
        a.sendall(b"GET / HTTP/1.1\r\n")
        with pytest.raises(FramingBroken, match="exceeds"):
            recv_frame(b)


def test_clean_close_between_frames_and_torn_frame():
    a, b = socket.socketpair()
    with b:
        a.close()
        assert recv_frame(b) is None
    a, b = socket.socketpair()
    with b:
        a.sendall(encode_frame({"op": "stats"})[:7])
        a.close()
        with pytest.raises(FramingBroken, match="closed"):
            recv_frame(b)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "explode"}, "unknown op"),
        ({"op": "begin", "rank": 0}, "needs field 'step'"),
        ({"op": "begin", "rank": "0", "step": 1}, "must be int"),
        ({"op": "begin", "rank": True, "step": 1}, "must be int"),
        ({"op": "begin", "rank": 0, "step": -1}, ">= 0"),
        ({"op": "stats", "id": "x"}, "request id"),
    ],
)
def test_request_validation(message, error):
    with pytest.raises(ProtocolError, match=error):
        parse_request(message)


def test_valid_request():
    request = parse_request(json.loads('{"op": "begin", "id": 7, "rank": 1, "step": 4}'))
    assert (request.op, request.id, request["rank"], request["step"]) == ("begin", 7, 1, 4)
