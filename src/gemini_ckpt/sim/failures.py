"""Seeded failure timelines: Poisson failures per machine plus correlated failure-domain events."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gemini_ckpt.sim.params import DAY_S, Scenario


@dataclass(frozen=True)
class FailureEvent:
    """Machines that fail together at one instant.

    Attributes:
        time_s: When, in seconds from the start of the run.
        machines: The machines that fail (one, or a whole failure domain).
        hardware: True when the machines and their CPU memory are lost; False for a software
            failure (the process dies, the machine and its memory survive).
        domain: The failure domain of a correlated event, else None.
    """

    time_s: float
    machines: tuple[int, ...]
    hardware: bool
    domain: int | None = None


def failure_events(scenario: Scenario, horizon_s: float, rng: random.Random) -> list[FailureEvent]:
    """Draw every failure of one run of `horizon_s` seconds, in time order.

    Independent failures arrive at N * rate per machine (each machine equally likely, hardware with
    probability `hardware_fraction`); each of the ceil(N / domain_size) domains also fails as a
    whole at `domain_failures_per_day`. The merged stream is Poisson with the summed rate.
    """
    f = scenario.failures
    machines = scenario.cluster.machines
    domains = math.ceil(machines / f.domain_size) if f.domain_size else 0
    single_rate = machines * f.per_machine_per_day / DAY_S
    domain_rate = domains * f.domain_failures_per_day / DAY_S
    total = single_rate + domain_rate
    events: list[FailureEvent] = []
    if total <= 0:
        return events
    now = rng.expovariate(total)
    while now < horizon_s:
        if rng.random() * total < single_rate:
            machine = rng.randrange(machines)
            hardware = rng.random() < f.hardware_fraction
            events.append(FailureEvent(now, (machine,), hardware))
        else:
            domain = rng.randrange(domains)
            first = domain * f.domain_size
            members = tuple(range(first, min(machines, first + f.domain_size)))
            events.append(FailureEvent(now, members, True, domain))
        now += rng.expovariate(total)
    return events
