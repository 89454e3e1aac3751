"""Exact probabilities that every checkpoint survives k simultaneous machine failures.

The failed set is a uniformly random k-subset of the N machines (the paper's model: independent,
equally likely failures). Recovery from CPU memory works iff no machine lost its whole holder set.
All results are exact `Fraction`s.

- `recovery_probability` is exact for any N: it splits the placement into its groups, counts the
  safe failure subsets of each group (a closed form for full groups and rings, enumeration for
  other small groups) and convolves the counts.
- `enumerated_recovery_probability` checks every k-subset directly (small N only).
- `corollary1`, `group_inclusion_exclusion`, `ring_union_bound` and `theorem1_upper_bound` are the
  paper's closed forms (Corollary 1, its inclusion-exclusion refinement, the authors' ring formula
  and Theorem 1's bound).
"""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations
from math import comb

from gemini_ckpt.errors import PlacementError
from gemini_ckpt.placement.layout import Placement

ENUMERATION_LIMIT = 2_000_000
"""Most failure subsets `enumerated_recovery_probability` will visit."""
_GROUP_ENUMERATION_MAX = 20


def recovery_probability(placement: Placement, failures: int) -> Fraction:
    """P(every checkpoint has a surviving copy | `failures` machines fail at once), exactly.

    Raises:
        PlacementError: `failures` is outside 0..N, or a group of an irregular (custom) placement
            has more than 20 machines.
    """
    n = placement.machines
    _check_failures(n, failures)
    safe = [1]
    for group in placement.groups:
        safe = _convolve(safe, _safe_counts(placement, group, failures), failures)
    return Fraction(safe[failures] if failures < len(safe) else 0, comb(n, failures))


def enumerated_recovery_probability(placement: Placement, failures: int) -> Fraction:
    """The same probability by visiting every failure subset (brute force, small N only).

    Raises:
        PlacementError: `failures` is outside 0..N or C(N, k) exceeds `ENUMERATION_LIMIT`.
    """
    n = placement.machines
    _check_failures(n, failures)
    total = comb(n, failures)
    if total > ENUMERATION_LIMIT:
        raise PlacementError(
            f"C({n}, {failures}) = {total} failure sets exceed the enumeration limit "
            f"{ENUMERATION_LIMIT}; use recovery_probability"
        )
    holder_sets = {frozenset(held_by) for held_by in placement.holders}
    lost = sum(
        1
        for failed in combinations(range(n), failures)
        if any(hs <= set(failed) for hs in holder_sets)
    )
    return Fraction(total - lost, total)


def corollary1(machines: int, replicas: int, failures: int) -> Fraction:
    """Corollary 1 for group placement: 1 - (N/m) C(N-m, k-m) / C(N, k), floored at 0.

    Exact for k < 2m (and 1 for k < m); a lower bound for k >= 2m, where a failed set can
    contain two whole groups.

    Raises:
        PlacementError: m does not divide N, or k is outside 0..N.
    """
    _check_divides(machines, replicas)
    _check_failures(machines, failures)
    if failures < replicas:
        return Fraction(1)
    lost = Fraction(machines, replicas) * comb(machines - replicas, failures - replicas)
    return max(Fraction(0), 1 - lost / comb(machines, failures))


def group_inclusion_exclusion(machines: int, replicas: int, failures: int) -> Fraction:
    """Exact recovery probability of group placement at any k, by inclusion-exclusion over groups.

    1 - sum_{j>=1} (-1)^(j+1) C(G, j) C(N - jm, k - jm) / C(N, k), with G = N/m groups.

    Raises:
        PlacementError: m does not divide N, or k is outside 0..N.
    """
    _check_divides(machines, replicas)
    _check_failures(machines, failures)
    groups = machines // replicas
    lost = sum(
        (-1) ** (j + 1) * comb(groups, j) * comb(machines - j * replicas, failures - j * replicas)
        for j in range(1, min(groups, failures // replicas) + 1)
    )
    return 1 - Fraction(lost, comb(machines, failures))


def ring_union_bound(machines: int, replicas: int, failures: int) -> Fraction:
    """The authors' ring formula 1 - N C(N-m, k-m) / C(N, k): exact only for k = m.

    It counts N distinct holder sets and ignores failure sets that cover two of them, so for
    k > m it under-states ring placement (N=16, m=2, k=3: 0.600 against the exact 0.6286).

    Raises:
        PlacementError: invalid sizes.
    """
    _check_failures(machines, failures)
    if not 1 <= replicas <= machines:
        raise PlacementError(f"need 1 <= m <= N, got N={machines}, m={replicas}")
    if failures < replicas:
        return Fraction(1)
    lost = machines * comb(machines - replicas, failures - replicas)
    return max(Fraction(0), 1 - Fraction(lost, comb(machines, failures)))


def theorem1_upper_bound(machines: int, replicas: int) -> Fraction:
    """Theorem 1: no placement recovers k = m failures with probability above 1 - ceil(N/m)/C(N, m).

    Raises:
        PlacementError: invalid sizes.
    """
    if not 1 <= replicas <= machines:
        raise PlacementError(f"need 1 <= m <= N, got N={machines}, m={replicas}")
    return 1 - Fraction(-(-machines // replicas), comb(machines, replicas))


def mixed_gap(machines: int, replicas: int) -> Fraction:
    """How far mixed placement falls below Theorem 1's bound at k = m: (r + m - 2) / C(N, m).

    Zero when m divides N (r = N mod m = 0); never more than (2m - 3) / C(N, m).

    Raises:
        PlacementError: invalid sizes.
    """
    if not 1 <= replicas <= machines:
        raise PlacementError(f"need 1 <= m <= N, got N={machines}, m={replicas}")
    remainder = machines % replicas
    if remainder == 0:
        return Fraction(0)
    return Fraction(remainder + replicas - 2, comb(machines, replicas))


def distinct_holder_sets(placement: Placement) -> int:
    """The number n = |S'| of distinct holder sets; at k = m, P(fail) = n / C(N, m)."""
    return len({frozenset(held_by) for held_by in placement.holders})


def _check_failures(machines: int, failures: int) -> None:
    if not 0 <= failures <= machines:
        raise PlacementError(f"k={failures} failures must be within 0..N={machines}")


def _check_divides(machines: int, replicas: int) -> None:
    if replicas < 1 or machines < replicas or machines % replicas:
        raise PlacementError(f"group placement needs m | N, got N={machines}, m={replicas}")


def _convolve(left: list[int], right: list[int], limit: int) -> list[int]:
    out = [0] * min(len(left) + len(right) - 1, limit + 1)
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            if i + j <= limit:
                out[i + j] += a * b
    return out


def _safe_counts(placement: Placement, group: tuple[int, ...], limit: int) -> list[int]:
    """safe[j]: j-subsets of `group` that leave every holder set in it with a survivor."""
    size, m = len(group), placement.replicas
    top = min(size, limit)
    if size == m:
        return [comb(size, j) if j < m else 0 for j in range(top + 1)]
    cycle = _ring_order(placement, group)
    if cycle is not None:
        return [_cyclic_safe(size, m, j) for j in range(top + 1)]
    if size > _GROUP_ENUMERATION_MAX:
        raise PlacementError(
            f"a group of {size} machines has no closed form and is too large to enumerate"
        )
    holder_sets = [frozenset(placement.holders[owner]) for owner in group]
    counts = [0] * (top + 1)
    for j in range(top + 1):
        for failed in combinations(group, j):
            down = set(failed)
            counts[j] += not any(hs <= down for hs in holder_sets)
    return counts


def _ring_order(placement: Placement, group: tuple[int, ...]) -> list[int] | None:
    """The cyclic order of `group` if each holder tuple is m consecutive members of it."""
    if placement.replicas < 2:
        return None
    start = group[0]
    order = [start]
    while len(order) < len(group):
        order.append(placement.holders[order[-1]][1])
    size, m = len(group), placement.replicas
    position = {machine: j for j, machine in enumerate(order)}
    if len(position) != size:
        return None
    for j, owner in enumerate(order):
        if placement.holders[owner] != tuple(order[(j + s) % size] for s in range(m)):
            return None
    return order


def _linear_safe(length: int, ones: int, m: int) -> int:
    """Binary strings of `length` with `ones` ones and no run of m ones (bounded compositions)."""
    if ones < 0 or ones > length:
        return 0
    slots = length - ones + 1
    return sum(
        (-1) ** i * comb(slots, i) * comb(ones - i * m + slots - 1, slots - 1)
        for i in range(min(slots, ones // m) + 1)
    )


def _cyclic_safe(size: int, m: int, ones: int) -> int:
    """Cyclic binary strings of `size` positions with `ones` ones and no m cyclically consecutive.

    Split on the leading run of a ones and the trailing run of b ones (a + b < m, so the run across
    the wrap is short), each closed by a zero; the middle is a linear string.
    """
    if ones == size:
        return 0
    total = 0
    for lead in range(m):
        for trail in range(m - lead):
            middle = size - lead - trail - 2
            if middle == -1:
                total += ones == size - 1
            elif middle >= 0:
                total += _linear_safe(middle, ones - lead - trail, m)
    return total
