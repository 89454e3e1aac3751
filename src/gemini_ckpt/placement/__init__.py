"""Checkpoint placement: who holds whose checkpoint, and how likely recovery from memory is.

Pure functions and values, no I/O. `place()` is the policy entry point (a placement plus the reason
for it); `recovery_probability()` gives the exact chance that k simultaneous failures leave every
checkpoint a surviving copy.
"""

from gemini_ckpt.placement.analysis import (
    corollary1,
    distinct_holder_sets,
    enumerated_recovery_probability,
    group_inclusion_exclusion,
    mixed_gap,
    recovery_probability,
    ring_union_bound,
    theorem1_upper_bound,
)
from gemini_ckpt.placement.layout import Placement
from gemini_ckpt.placement.strategy import (
    STRATEGIES,
    describe,
    domain_conflicts,
    group_placement,
    mixed_placement,
    place,
    ring_placement,
)

__all__ = [
    "STRATEGIES",
    "Placement",
    "corollary1",
    "describe",
    "distinct_holder_sets",
    "domain_conflicts",
    "enumerated_recovery_probability",
    "group_inclusion_exclusion",
    "group_placement",
    "mixed_gap",
    "mixed_placement",
    "place",
    "recovery_probability",
    "ring_placement",
    "ring_union_bound",
    "theorem1_upper_bound",
]
