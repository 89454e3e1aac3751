"""The agent answers garbage with an error and keeps serving its trainers."""

from __future__ import annotations

import socket

import torch

from gemini_ckpt import Checkpointer
from gemini_ckpt.agent.embedded import EmbeddedAgent
from gemini_ckpt.protocol.framing import encode_frame, recv_frame


def raw_connection(agent: EmbeddedAgent) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(agent.config.socket_path))
    return sock


def test_garbage_gets_error_replies_and_trainers_keep_working(agent: EmbeddedAgent):
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(model, optimizer, config=agent.trainer_config())
    ckpt.restore()
    ckpt.save(1)
    ckpt.wait()

    # Bytes that cannot be framed: an error reply, then that connection (only) is closed.
    with raw_connection(agent) as sock:
        sock.sendall(b"hello agent, how are you?\n")
        reply = recv_frame(sock)
        assert reply["ok"] is False
        assert reply["error"]["kind"] == "FramingBroken"
        assert "exceeds" in reply["error"]["message"]
        assert recv_frame(sock) is None

    # Well-framed nonsense: an error reply per request, and the connection stays usable.
    with raw_connection(agent) as sock:
        cases = [
            (b"\x00\x00\x00\x05{oops", "ProtocolError", "not valid UTF-8 JSON"),
            (encode_frame({"op": "launch-missiles", "id": 1}), "ProtocolError", "unknown op"),
            (
                encode_frame({"op": "begin", "id": 2, "rank": "zero", "step": 1}),
                "ProtocolError",
                "must be int",
            ),
            (
                encode_frame({"op": "begin", "id": 3, "rank": 0, "step": 2}),
                "ProtocolError",
                "before its hello",
            ),
            (
                encode_frame({"op": "hello", "id": 4, "rank": 9, "pid": 1, "generation": 0}),
                "ProtocolError",
                "does not run on machine 0",
            ),
        ]
        for frame, kind, text in cases:
            sock.sendall(frame)
            reply = recv_frame(sock)
            assert reply["ok"] is False, reply
            assert reply["error"]["kind"] == kind
            assert text in reply["error"]["message"]
        sock.sendall(encode_frame({"op": "hello", "id": 5, "rank": 0, "pid": 1, "generation": 0}))
        assert recv_frame(sock)["ok"] is True
        bad_manifest = {"op": "commit", "id": 6, "rank": 0, "slot": 0, "manifest": {"job": "x"}}
        sock.sendall(encode_frame(bad_manifest))
        reply = recv_frame(sock)
        assert reply["error"]["kind"] == "CorruptCheckpointError"
        assert "malformed manifest" in reply["error"]["message"]
        sock.sendall(encode_frame({"op": "stats", "id": 7}))
        stats = recv_frame(sock)
        assert stats["ok"] is True and stats["inventory"] == {"0": [1]}

    # The trainer's own connection was never disturbed.
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    ckpt.save(2)
    ckpt.close()
    assert agent.store.inventory() == {0: [1, 2]}


def test_bad_timing_is_refused_before_anything_is_committed(agent: EmbeddedAgent):
    model = torch.nn.Linear(8, 8)
    with Checkpointer(model, config=agent.trainer_config(snapshot_mode="sync")) as ckpt:
        ckpt.save(1)
    manifest = agent.store.locate(0, 1).manifest.to_dict()
    with raw_connection(agent) as sock:
        sock.sendall(encode_frame({"op": "hello", "id": 1, "rank": 0, "pid": 1, "generation": 0}))
        assert recv_frame(sock)["ok"]
        # A begin's timing (the next iteration's start, for the pacer) is checked as strictly.
        bad_begin = {"op": "begin", "id": 2, "rank": 0, "step": 2}
        sock.sendall(encode_frame({**bad_begin, "timing": {"iteration_start": "now"}}))
        reply = recv_frame(sock)
        assert reply["ok"] is False
        assert "timing iteration_start must be a finite number" in reply["error"]["message"]
        begin = {**bad_begin, "timing": {"iteration_start": 12.5}}
        sock.sendall(encode_frame(begin))
        slot = recv_frame(sock)["slot"]
        for timing, text in (
            ('{"t":"soon"}', "unknown timing fields ['t']"),
            ('{"copy_s":"fast"}', "timing copy_s must be a finite number"),
            ('{"metrics":{"loss":1e400}}', "metric 'loss' must be a finite number"),
        ):
            commit = {
                "op": "commit",
                "id": 3,
                "rank": 0,
                "slot": slot,
                "manifest": {**manifest, "step": 2},
                "timing": {},
            }
            body = encode_frame(commit)[4:].replace(b'"timing":{}', f'"timing":{timing}'.encode())
            sock.sendall(len(body).to_bytes(4, "big") + body)
            reply = recv_frame(sock)
            assert reply["ok"] is False
            assert text in reply["error"]["message"]
    assert agent.store.inventory() == {0: [1]}


def test_a_second_live_trainer_for_a_rank_is_refused(agent: EmbeddedAgent):
    import subprocess
    import sys

    model = torch.nn.Linear(8, 8)
    with Checkpointer(model, config=agent.trainer_config()) as ckpt:
        ckpt.start()
        code = (
            "import sys; from gemini_ckpt.snapshot.agent_client import AgentClient;"
            "c = AgentClient(__import__('pathlib').Path(sys.argv[1]), 5); c.connect();"
            "c.request('hello', rank=0, pid=1, generation=0)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(agent.config.socket_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "rank 0 already has a trainer" in result.stderr
        ckpt.save(1)
