"""How one etcd call moves between endpoints (no server: the probe and the call are fakes)."""

from __future__ import annotations

import time

import grpc
import pytest

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.etcd_transport import Endpoint, EndpointPool
from gemini_ckpt.errors import CoordinationUnavailableError


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses; Connection refused"


def _pool(probe, endpoints=("127.0.0.1:1", "127.0.0.1:2")) -> EndpointPool:
    pool = EndpointPool(EtcdClientConfig(endpoints, attempt_timeout_s=1.0))
    pool.open(lambda channel: None, probe)
    return pool


def test_members_that_all_refuse_at_once_are_retried_in_paced_rounds():
    probes: list[str] = []

    def refuse(endpoint: Endpoint, timeout_s: float) -> None:
        probes.append(endpoint.address)
        raise _Refused()

    pool = _pool(refuse)
    started = time.monotonic()
    with pytest.raises(CoordinationUnavailableError, match="127.0.0.1:1.*Connection refused"):
        pool.call("get", lambda endpoint, t: b"", timeout_s=0.4)
    assert time.monotonic() - started == pytest.approx(0.4, abs=0.1)
    # Pauses of 50, 100 and 200 ms between rounds of two: a handful of probes, not a spin.
    assert 4 <= len(probes) <= 10
    pool.close()


def test_a_refusing_member_hands_the_call_to_the_next_within_the_same_attempt():
    def probe(endpoint: Endpoint, timeout_s: float) -> None:
        if endpoint.address.endswith(":1"):
            raise _Refused()

    pool = _pool(probe)
    answered = pool.call("get", lambda endpoint, t: endpoint.address, timeout_s=1.0)
    assert answered == "127.0.0.1:2"
    assert pool.pick().address == "127.0.0.1:2"  # later calls start at the one that answered
    pool.close()
