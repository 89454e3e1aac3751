"""Recovery probabilities: the paper's numbers (reference §2.4, §7 A) and brute-force optimality."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations, product
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_ckpt.errors import PlacementError
from gemini_ckpt.placement import (
    Placement,
    corollary1,
    distinct_holder_sets,
    enumerated_recovery_probability,
    group_inclusion_exclusion,
    mixed_gap,
    mixed_placement,
    recovery_probability,
    ring_placement,
    ring_union_bound,
    theorem1_upper_bound,
)


def _p(placement: Placement, k: int) -> float:
    return round(float(recovery_probability(placement, k)), 4)


@pytest.mark.parametrize(
    ("n", "m", "k", "grouped", "ring"),
    [
        (16, 2, 2, 0.9333, 0.8667),
        (16, 2, 3, 0.8000, 0.6286),
        (16, 2, 4, 0.6154, 0.3626),
        (16, 3, 3, 0.9857, 0.9714),
        (5, 2, 2, 0.6000, 0.5000),
        (17, 2, 2, 0.9265, 0.8750),
        (7, 3, 3, 0.8571, 0.8000),
        (32, 2, 2, 0.9677, 0.9355),
        (64, 2, 2, 0.9841, 0.9683),
        (128, 2, 2, 0.9921, 0.9843),
        (32, 2, 3, 0.9032, None),
        (64, 2, 3, 0.9524, None),
        (128, 2, 3, 0.9764, None),
    ],
)
def test_reference_probabilities(
    n: int, m: int, k: int, grouped: float, ring: float | None
) -> None:
    assert _p(mixed_placement(n, m), k) == grouped
    if ring is not None:
        assert _p(ring_placement(n, m), k) == ring


def test_paper_statements_for_16_machines() -> None:
    assert float(1 - recovery_probability(mixed_placement(16, 2), 2)) == pytest.approx(
        0.0667, abs=5e-5
    )
    # the notebook's ring curve (a union bound), "25 % lower" than Gemini at k = 3
    assert float(ring_union_bound(16, 2, 3)) == pytest.approx(0.600)
    assert float(recovery_probability(ring_placement(16, 2), 3)) == pytest.approx(0.6286, abs=5e-5)


@pytest.mark.parametrize("n", [16, 24, 32, 48, 64, 96, 127, 128])
def test_figure_9_curves(n: int) -> None:
    """Fig 9: the notebook formulas against exact values, N = 16..128, m = 2."""
    for k in (2, 3):
        exact_ring = recovery_probability(ring_placement(n, 2), k)
        assert ring_union_bound(n, 2, k) <= exact_ring
        assert (ring_union_bound(n, 2, k) == exact_ring) == (k == 2)
        if n % 2 == 0:
            assert recovery_probability(mixed_placement(n, 2), k) == corollary1(n, 2, k)
    assert round(float(ring_union_bound(128, 2, 3)), 4) == 0.9528  # the plotted ring value
    assert recovery_probability(mixed_placement(n, 2), 1) == 1


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, min(4, n)))))
@settings(max_examples=40, deadline=None)
def test_closed_forms_equal_enumeration(nm: tuple[int, int]) -> None:
    n, m = nm
    for k in range(n + 1):
        for p in (mixed_placement(n, m), ring_placement(n, m)):
            assert recovery_probability(p, k) == enumerated_recovery_probability(p, k)
        if n % m == 0:
            exact = group_inclusion_exclusion(n, m, k)
            assert exact == recovery_probability(mixed_placement(n, m), k)
            if k < 2 * m:
                assert corollary1(n, m, k) == exact
            else:
                assert corollary1(n, m, k) <= exact


def test_corollary_1_is_only_a_bound_past_2m() -> None:
    assert corollary1(16, 2, 4) == Fraction(3, 5)
    assert round(float(group_inclusion_exclusion(16, 2, 4)), 4) == 0.6154


def test_theorem_1_bound_and_mixed_gap() -> None:
    for n, m in [(5, 2), (17, 2), (7, 3), (16, 3), (10, 4), (64, 4), (66, 4)]:
        mixed = recovery_probability(mixed_placement(n, m), m)
        assert theorem1_upper_bound(n, m) - mixed == mixed_gap(n, m)
        assert mixed_gap(n, m) == (Fraction(n % m + m - 2, comb(n, m)) if n % m else 0)
        assert mixed_gap(n, m) <= Fraction(2 * m - 3, comb(n, m))
    assert theorem1_upper_bound(5, 2) == Fraction(7, 10)
    assert round(float(theorem1_upper_bound(17, 2)), 4) == 0.9338
    assert mixed_gap(16, 2) == 0


def _all_placements(n: int, m: int) -> list[Placement]:
    """Every placement: each machine keeps its own copy plus any m-1 other holders."""
    options = [
        [(owner, *peers) for peers in combinations([x for x in range(n) if x != owner], m - 1)]
        for owner in range(n)
    ]
    return [Placement(kind="custom", holders=tuple(h)) for h in product(*options)]


@pytest.mark.parametrize(("n", "m"), [(4, 2), (6, 2), (5, 2), (4, 3), (3, 3)])
def test_brute_force_over_all_placements(n: int, m: int) -> None:
    """Group placement is optimal at k = m when m | N; mixed is within (2m-3)/C(N,m) otherwise."""
    # At k = m, P(fail) = n'/C(N, m), n' = distinct holder sets (checked by enumeration below)
    best = 1 - Fraction(min(map(distinct_holder_sets, _all_placements(n, m))), comb(n, m))
    mixed = recovery_probability(mixed_placement(n, m), m)
    assert best == theorem1_upper_bound(n, m)
    if n % m == 0:
        assert mixed == best
    else:
        assert 0 < best - mixed == mixed_gap(n, m)


@pytest.mark.parametrize(("n", "m"), [(6, 3), (8, 4), (9, 3), (8, 2)])
def test_brute_force_over_holder_set_families(n: int, m: int) -> None:
    """Larger cases through Theorem 1's argument: at k = m, P(fail) = n'/C(N, m), n' = distinct
    holder sets, and any family of m-sets covering every machine is some placement's n'. Search
    families by size for the smallest cover; group placement attains it."""
    sets = list(combinations(range(n), m))
    fewest = next(
        size
        for size in range(1, len(sets) + 1)
        if any(len(set().union(*family)) == n for family in combinations(sets, size))
    )
    group = mixed_placement(n, m)
    assert distinct_holder_sets(group) == fewest
    assert recovery_probability(group, m) == 1 - Fraction(fewest, comb(n, m))


def test_distinct_holder_sets_match_enumeration_for_every_placement_of_4() -> None:
    for p in _all_placements(4, 2):
        assert enumerated_recovery_probability(p, 2) == 1 - Fraction(distinct_holder_sets(p), 6)


def test_invalid_failure_counts_and_large_irregular_groups() -> None:
    with pytest.raises(PlacementError, match="k=17"):
        recovery_probability(mixed_placement(16, 2), 17)
    with pytest.raises(PlacementError, match="enumeration limit"):
        enumerated_recovery_probability(mixed_placement(64, 2), 8)
    with pytest.raises(PlacementError, match="m \\| N"):
        corollary1(17, 2, 2)
    assert recovery_probability(mixed_placement(16, 2), 0) == 1
