"""One contract for every KV implementation: the in-memory one and torch's TCPStore."""

import pytest

from gemini_ckpt.coordination.kv import MemoryKV, TCPStoreKV
from gemini_ckpt.errors import CoordinationError


@pytest.fixture(params=["memory", "tcpstore"])
def kv(request):
    if request.param == "memory":
        yield MemoryKV()
    else:
        server = TCPStoreKV.host("127.0.0.1", 0)
        yield TCPStoreKV.connect("127.0.0.1", server.port, timeout_s=5)


def test_get_set_delete(kv):
    assert kv.get("a") is None
    kv.set("a", b"1")
    assert kv.get("a") == b"1"
    kv.set("a", b"2")
    assert kv.get("a") == b"2"
    kv.delete("a")
    assert kv.get("a") is None
    kv.delete("a")  # idempotent


def test_add_is_a_counter(kv):
    assert kv.add("n", 1) == 1
    assert kv.add("n", 2) == 3
    assert kv.get("n") == b"3"


def test_compare_set(kv):
    assert kv.compare_set("g", None, b"0")
    assert not kv.compare_set("g", None, b"5")
    assert kv.compare_set("g", b"0", b"1")
    assert not kv.compare_set("g", b"0", b"2")
    assert kv.get("g") == b"1"


def test_unreachable_store_is_a_clear_error():
    server = TCPStoreKV.host("127.0.0.1", 0)
    port = server.port
    del server
    with pytest.raises(CoordinationError, match=f"cannot reach the job store at 127.0.0.1:{port}"):
        TCPStoreKV.connect("127.0.0.1", port, timeout_s=0.5)
