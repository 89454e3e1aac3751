import pytest

from gemini_ckpt.config import TrainerConfig, format_size, parse_size
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.summary import summarize


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512MiB", 512 << 20),
        ("8GiB", 8 << 30),
        ("1.5GB", 1_500_000_000),
        ("2k", 2000),
        ("3 MiB", 3 << 20),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ConfigError, match="not a byte size: 'lots'"):
        parse_size("lots")


def test_format_size():
    assert format_size(1536) == "1.50 KiB"
    assert format_size(3 << 30) == "3.00 GiB"


def test_trainer_config_needs_an_agent():
    with pytest.raises(ConfigError, match="no Gemini agent found.*gemini-ckpt launch"):
        TrainerConfig.from_env({})


def test_trainer_config_from_env():
    config = TrainerConfig.from_env(
        {
            "GEMINI_AGENT_SOCKET": "/tmp/a.sock",
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "TORCHELASTIC_RESTART_COUNT": "2",
            "GEMINI_SNAPSHOT_MODE": "sync",
            "GEMINI_CHUNK_SIZE": "1MiB",
            "GEMINI_COPY_NICE": "0",
        }
    )
    assert config.copy_nice == 0
    assert (config.rank, config.generation, config.snapshot_mode, config.chunk_size) == (
        3,
        2,
        "sync",
        1 << 20,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
        ({"GEMINI_SNAPSHOT_MODE": "eager"}, "snapshot mode 'eager'"),
        ({"GEMINI_CHUNK_SIZE": "100"}, "chunk size"),
        ({"GEMINI_COPY_NICE": "20"}, "copy nice must be between 0 and 19, got 20"),
        ({"RANK": "x"}, "invalid Gemini environment"),
    ],
)
def test_trainer_config_rejects_bad_values(env, message):
    with pytest.raises(ConfigError, match=message):
        TrainerConfig.from_env({"GEMINI_AGENT_SOCKET": "/tmp/a.sock", **env})


def test_summary_of_one_recovery():
    t = 1000.0
    records = [
        {"t": t + 1, "event": ev.PROGRESS, "machine": 0, "generation": 0, "step": 5},
        {"t": t + 1.1, "event": ev.PROGRESS, "machine": 1, "generation": 0, "step": 6},
        {"t": t + 2, "event": ev.FAULT_INJECTED, "machine": 0, "rank": 1, "fault": "f", "pid": 9},
        {
            "t": t + 2.5,
            "event": ev.WORKER_FAILED,
            "machine": 0,
            "generation": 0,
            "rank": 1,
            "description": "rank 1 (pid 9) was killed by SIGKILL",
        },
        {"t": t + 3, "event": ev.RESTART, "machine": 0, "generation": 1},
        {
            "t": t + 4,
            "event": ev.PLAN,
            "machine": 0,
            "generation": 1,
            "step": 5,
            "sources": {"0": "local memory", "1": "local memory"},
            "reason": "r",
        },
        {
            "t": t + 4,
            "event": ev.PLAN,
            "machine": 1,
            "generation": 1,
            "step": 5,
            "sources": {"2": "local memory"},
            "reason": "r",
        },
        {
            "t": t + 6,
            "event": ev.RESTORED,
            "machine": 0,
            "generation": 1,
            "rank": 1,
            "step": 5,
            "source": "local memory",
            "seconds": 0.05,
        },
        {"t": t + 9, "event": ev.PROGRESS, "machine": 0, "generation": 1, "step": 6},
        {"t": t + 10, "event": ev.JOB_FINISHED, "machine": 0, "status": "succeeded"},
        {
            "t": t + 0.5,
            "event": ev.MEMORY,
            "machine": 1,
            "rank": 2,
            "slot_bytes": 4 << 20,
            "reserved": 8 << 20,
            "budget": 1 << 30,
        },
        {
            "t": t + 0.6,
            "event": ev.MEMORY,
            "machine": 1,
            "rank": 3,
            "slot_bytes": 4 << 20,
            "reserved": 16 << 20,
            "budget": 1 << 30,
        },
    ]
    summary = summarize(records)
    assert summary.status == "succeeded" and summary.final_step == 6
    (r,) = summary.recoveries
    assert (r.restored_step, r.highest_committed, r.iterations_lost) == (5, 6, 1)
    assert r.sources == {0: "local memory", 1: "local memory", 2: "local memory"}
    assert r.failed_at == t + 2 and r.detected_at == t + 2.5
    assert r.seconds_to_next_step == pytest.approx(7.0)
    assert r.restore_seconds == {1: 0.05}
    assert summary.memory == {1: (16 << 20, 1 << 30)}
