"""Shapes of group, mixed and ring placement for N = 1..64, m = 1..4, and failure domains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_ckpt.errors import PlacementError
from gemini_ckpt.placement import (
    Placement,
    domain_conflicts,
    group_placement,
    mixed_placement,
    place,
    ring_placement,
)

sizes = st.integers(min_value=1, max_value=64).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=1, max_value=min(4, n)))
)


def _check_holders(p: Placement, n: int, m: int) -> None:
    assert p.machines == n
    assert p.replicas == m
    for machine in range(n):
        held_by = p.holders_of(machine)
        assert held_by[0] == machine
        assert len(set(held_by)) == m
        assert all(0 <= h < n for h in held_by)
        assert p.peers_of(machine) == held_by[1:]
        for h in held_by:
            assert machine in p.replicas_of(h)
    # every machine stores exactly m checkpoints (traffic and memory are balanced)
    assert all(len(p.replicas_of(machine)) == m for machine in range(n))


@given(sizes)
@settings(max_examples=60)
def test_mixed_placement_has_algorithm_1_shape(nm: tuple[int, int]) -> None:
    n, m = nm
    p = mixed_placement(n, m)
    _check_holders(p, n, m)
    members = sorted(machine for group in p.groups for machine in group)
    assert members == list(range(n))  # groups are disjoint and cover everything
    sizes_ = [len(g) for g in p.groups]
    assert sizes_[:-1] == [m] * (n // m - 1)
    assert sizes_[-1] == m + n % m
    assert p.kind == ("group" if n % m == 0 else "mixed")
    for group in p.groups:
        for machine in group:
            assert set(p.holders_of(machine)) <= set(group)
            if len(group) == m:  # a full group: every member holds the whole group
                assert set(p.holders_of(machine)) == set(group)
    last = p.groups[-1]
    for j, machine in enumerate(last):  # ring inside the last group
        assert p.holders_of(machine) == tuple(last[(j + s) % len(last)] for s in range(m))


@given(sizes)
@settings(max_examples=60)
def test_ring_placement_uses_the_next_machines(nm: tuple[int, int]) -> None:
    n, m = nm
    p = ring_placement(n, m)
    _check_holders(p, n, m)
    for machine in range(n):
        assert p.holders_of(machine) == tuple((machine + s) % n for s in range(m))


@given(sizes)
@settings(max_examples=60)
def test_group_placement_exactly_when_m_divides_n(nm: tuple[int, int]) -> None:
    n, m = nm
    if n % m:
        with pytest.raises(PlacementError, match="m \\| N"):
            group_placement(n, m)
        return
    p = group_placement(n, m)
    _check_holders(p, n, m)
    assert p.groups == tuple(tuple(range(i, i + m)) for i in range(0, n, m))


def test_algorithm_1_examples_from_the_paper() -> None:
    assert mixed_placement(4, 2).groups == ((0, 1), (2, 3))
    five = mixed_placement(5, 2)
    assert five.groups == ((0, 1), (2, 3, 4))
    assert five.holders_of(4) == (4, 2)  # ring inside {3,4,5} (1-based in the paper)


def test_one_replica_keeps_every_machine_alone() -> None:
    p = mixed_placement(5, 1)
    assert p.groups == tuple((i,) for i in range(5))
    assert p.holders_of(3) == (3,)
    assert not p.recoverable([3])


def test_more_replicas_than_machines_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="m=5 replicas need at least 5 machines, got N=3"):
        mixed_placement(3, 5)
    with pytest.raises(PlacementError, match="m=0"):
        ring_placement(3, 0)
    with pytest.raises(PlacementError, match=r"outside 0\.\.3"):
        mixed_placement(4, 2).holders_of(4)


def test_recoverable_iff_no_holder_set_is_lost() -> None:
    p = mixed_placement(6, 2)
    assert p.recoverable([0, 2, 4])
    assert not p.recoverable([2, 3])
    assert p.lost_checkpoints([2, 3, 5]) == (2, 3)


def test_inconsistent_placement_values_are_rejected() -> None:
    with pytest.raises(PlacementError, match="not itself"):
        Placement(kind="custom", holders=((1, 0), (0, 1)))
    with pytest.raises(PlacementError, match="same number"):
        Placement(kind="custom", holders=((0, 1), (1,)))
    with pytest.raises(PlacementError, match="span several groups"):
        Placement(kind="custom", holders=((0, 1), (1, 0)), groups=((0,), (1,)))


def test_domain_aware_groups_never_share_a_rack_when_they_can() -> None:
    racks = [f"rack{i // 4}" for i in range(16)]  # racks of 4 consecutive machines
    plain, _ = place(16, 2)
    assert len(domain_conflicts(plain, racks)) == 16  # pairs (0,1), (2,3)... share a rack
    spread, reason = place(16, 2, domains=racks)
    assert domain_conflicts(spread, racks) == ()
    assert "every holder set spans 2 distinct domains out of 4" in reason
    ring, _ = place(16, 3, strategy="ring", domains=racks)
    assert domain_conflicts(ring, racks) == ()


def test_domain_conflicts_are_reported_when_unavoidable() -> None:
    racks = ["a"] * 6 + ["b"] * 2
    p, reason = place(8, 2, domains=racks)
    assert len(domain_conflicts(p, racks)) == 4  # two groups must be a+a
    assert "cannot separate every group" in reason
    with pytest.raises(PlacementError, match="3 domain labels for 8 machines"):
        place(8, 2, domains=["a", "b", "c"])


def test_reason_describes_the_shape() -> None:
    _, reason = place(13, 2)
    assert reason == (
        "mixed placement of N=13, m=2: 5 groups of 2, 1 group of 3 (ring inside); "
        "each machine sends 1 copy"
    )
    with pytest.raises(PlacementError, match="not one of"):
        place(4, 2, strategy="random")
