"""Profiles across processes: the idle time a machine's ranks share, and the wire form."""

from __future__ import annotations

import pytest

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave import IdleProfile, IdleSpan
from gemini_ckpt.interleave.profile import merge_profiles, profile_from_dict, profile_to_dict
from gemini_ckpt.interleave.settings import InterleaveSettings, ProfileSettings


def test_ranks_share_only_the_time_none_of_them_uses_the_link():
    a = IdleProfile(1.0, (IdleSpan(0.0, 0.5), IdleSpan(0.7, 0.3)))
    b = IdleProfile(1.2, (IdleSpan(0.1, 0.6), IdleSpan(0.9, 0.3)))
    merged = merge_profiles([a, b])
    assert merged.iteration_seconds == 1.2
    assert [(round(s.start, 9), round(s.length, 9)) for s in merged.spans] == [
        (0.1, 0.4),
        (0.9, 0.1),
    ]


def test_merging_one_profile_keeps_it():
    a = IdleProfile(1.0, (IdleSpan(0.0, 0.5), IdleSpan(0.7, 0.3)))
    merged = merge_profiles([a])
    assert merged.iteration_seconds == a.iteration_seconds
    assert [v for s in merged.spans for v in (s.start, s.length)] == pytest.approx(
        [v for s in a.spans for v in (s.start, s.length)]
    )
    with pytest.raises(ConfigError, match="at least one"):
        merge_profiles([])


def test_a_profile_survives_its_wire_form():
    a = IdleProfile(1.5, (IdleSpan(0.0, 0.5), IdleSpan(0.75, 0.25)))
    assert profile_from_dict(profile_to_dict(a)) == a


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "must be an object"),
        ({"iteration_s": 1.0}, "spans must be a list"),
        ({"iteration_s": 1.0, "spans": [[0.0]]}, r"spans\[0\] is not \[start, length\]"),
        ({"iteration_s": 1.0, "spans": [[0.0, True]]}, r"spans\[0\] is not"),
        ({"iteration_s": "1", "spans": []}, "iteration_s must be a number"),
        ({"iteration_s": 1.0, "spans": [[0.5, 0.6]]}, "after the iteration's"),
        ({"iteration_s": 1.0, "spans": [[0.0, -1.0]]}, "length must be"),
    ],
)
def test_a_malformed_profile_is_refused_with_the_reason(raw, message):
    with pytest.raises(ConfigError, match=message):
        profile_from_dict(raw)


def test_profile_settings_travel_in_one_variable():
    settings = ProfileSettings(iterations=7, warmup=1, min_span_s=0.002, drift=0.3)
    assert ProfileSettings.from_env(settings.to_env()) == settings
    with pytest.raises(ConfigError, match="not valid"):
        ProfileSettings.from_env("7,1,0.002")
    with pytest.raises(ConfigError, match="profile-iterations must be >= 1"):
        ProfileSettings.from_env("0,1,0.002,0.3")


def test_interleaving_needs_a_bandwidth_and_sane_buffers():
    with pytest.raises(ConfigError, match="--link-bandwidth"):
        InterleaveSettings(bandwidth_bytes_per_s=0.0)
    with pytest.raises(ConfigError, match="--interleave-margin"):
        InterleaveSettings(bandwidth_bytes_per_s=1e8, margin=1.5)
    with pytest.raises(ConfigError, match="--interleave-sub-buffers"):
        InterleaveSettings(bandwidth_bytes_per_s=1e8, buffer_bytes=2, sub_buffers=4)
    settings = InterleaveSettings(bandwidth_bytes_per_s=1.25e8)
    assert settings.chunk_bytes == 8 << 20
    traffic = settings.traffic(shard_bytes=100 << 20, remote_replicas=2)
    assert traffic.total_bytes == 200 << 20
    assert traffic.chunk_bytes == 8 << 20
