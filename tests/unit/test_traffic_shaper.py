"""The agent's interleaving: profiles from every local rank, then a schedule and paced sending."""

from __future__ import annotations

import pytest

from gemini_ckpt.agent.interleaving import TrafficShaper
from gemini_ckpt.errors import ProtocolError
from gemini_ckpt.interleave.settings import InterleaveSettings
from gemini_ckpt.observability.events import EventLog, read_events
from gemini_ckpt.protocol.messages import parse_request

SETTINGS = InterleaveSettings(bandwidth_bytes_per_s=125e6, buffer_bytes=8 << 20, sub_buffers=4)


def _profile(rank: int, spans: list[list[float]], period: float = 1.0):
    return parse_request(
        {
            "op": "profile",
            "id": 1,
            "rank": rank,
            "profile": {"iteration_s": period, "spans": spans, "spread": [0.05] * len(spans)},
        }
    )


@pytest.fixture
def shaper(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", machine=0)
    log.start()
    shaper = TrafficShaper(SETTINGS, range(2, 4), 1, lambda: 50 << 20, log)
    shaper.enter(3)
    return shaper


def test_sending_waits_until_every_local_rank_sent_its_profile(shaper, tmp_path):
    assert shaper.enabled and not shaper.ready()
    assert shaper.copy_by() is None  # not scheduled: trainers do not defer their copies
    assert shaper.profile_request(_profile(2, [[0.0, 0.6], [0.8, 0.2]])) == {"used": True}
    assert not shaper.ready()
    shaper.profile_request(_profile(3, [[0.1, 0.6], [0.8, 0.2]], period=1.1))
    assert shaper.ready()
    assert shaper.pacer.pacing
    (event,) = [
        e for e in read_events([tmp_path / "events.jsonl"]) if e["event"] == "interleave_schedule"
    ]
    assert event["generation"] == 3
    assert event["iteration_s"] == pytest.approx(1.1)
    assert [[round(v, 6) for v in span] for span in event["spans"]] == [[0.1, 0.5], [0.8, 0.2]]
    # 50 MiB at 125 MB/s is 0.42 s; 0.8 of 0.8 s of idle time is 0.64 s: every iteration.
    assert event["interval"] == 1
    # It needs the first span's time too: a deferred local copy must be done by 0.1 s.
    assert shaper.copy_by() == event["copy_by_s"] == pytest.approx(0.1)
    assert event["spread"] == {"2": [0.05, 0.05], "3": [0.05, 0.05]}
    status = shaper.status()["interleave"]
    assert status["profiled"] and status["interval"] == 1


def test_a_checkpoint_that_does_not_fit_one_iterations_idle_time_gets_a_longer_interval(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", machine=0)
    log.start()
    shaper = TrafficShaper(SETTINGS, range(1), 2, lambda: 200 << 20, log)
    shaper.enter(0)
    shaper.profile_request(_profile(0, [[0.0, 0.5]]))
    (event,) = [
        e for e in read_events([tmp_path / "events.jsonl"]) if e["event"] == "interleave_schedule"
    ]
    # 2 x 200 MiB at 125 MB/s in 0.4 s per iteration: 3.4 s of transfer, interval 9.
    assert event["interval"] == 9
    assert shaper.copy_by() is None  # the push needs every window it can get
    assert "exceed one iteration's idle time" in event["reason"]


def test_a_new_generation_profiles_again(shaper):
    shaper.profile_request(_profile(2, [[0.0, 0.6]]))
    shaper.profile_request(_profile(3, [[0.0, 0.6]]))
    assert shaper.ready()
    assert shaper.copy_by() is not None
    shaper.enter(4)
    assert not shaper.ready() and not shaper.pacer.pacing
    assert shaper.copy_by() is None


def test_a_malformed_profile_is_a_protocol_error_naming_the_rank(shaper):
    with pytest.raises(ProtocolError, match="profile of rank 2: .*spans"):
        shaper.profile_request(_profile(2, [[0.0]]))


def test_commits_anchor_the_pacers_iterations(shaper):
    shaper.profile_request(_profile(2, [[0.0, 0.6]]))
    shaper.profile_request(_profile(3, [[0.0, 0.6]]))
    assert shaper.pacer.next_grant(1000, 50.0) is None  # no iteration known yet
    shaper.iteration_started(2, 7, {"iteration_start": 50.0})
    assert shaper.pacer.next_grant(1000, 50.1) == (50.1, "in_window", 1000)


def test_without_interleaving_everything_is_sent_at_once(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", machine=0)
    shaper = TrafficShaper(None, range(1), 1, lambda: 1, log)
    assert not shaper.enabled and shaper.ready()
    assert shaper.pacing(lambda: False) is None
    assert shaper.profile_request(_profile(0, [[0.0, 0.5]])) == {"used": False}
    assert shaper.status() == {}
