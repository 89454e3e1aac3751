import pytest

from gemini_ckpt.errors import FaultSpecError
from gemini_ckpt.faults import FaultPoint, parse_fault, resolve_faults


def test_parse_and_resolve():
    specs = [
        parse_fault("kill-worker@step=12,rank=3"),
        parse_fault("kill-worker@step=4,machine=1,point=mid-save"),
    ]
    faults = resolve_faults(specs, machines=2, nproc_per_machine=2)
    assert [(f.rank, f.step, f.point) for f in faults] == [
        (3, 12, FaultPoint.AFTER_COMMIT),
        (2, 4, FaultPoint.MID_SAVE),
    ]


def test_random_rank_is_seeded():
    spec = [parse_fault("kill-worker@step=2,rank=random")]
    a = resolve_faults(spec * 5, 4, 2, seed=7)
    assert a == resolve_faults(spec * 5, 4, 2, seed=7)
    assert {f.rank for f in a} <= set(range(8))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kil-worker@step=1,rank=0",
            "unknown fault kind .kil-worker.*known kinds: kill-worker, hang",
        ),
        ("kill-worker", "has no parameters"),
        ("kill-worker@rank=0", "needs step=S"),
        ("kill-worker@step=1", "exactly one of rank=R or machine=M"),
        ("kill-worker@step=1,rank=0,machine=0", "exactly one of"),
        ("kill-worker@step=x,rank=0", "step='x'.*not an integer"),
        ("kill-worker@step=0,rank=0", "step=0.*>= 1"),
        ("kill-worker@step=1,rnk=0", "unknown parameter 'rnk'"),
        ("kill-worker@step=1,rank=0,rank=1", "given twice"),
        ("kill-worker@step=1,rank", "malformed parameter"),
        ("kill-worker@step=1,rank=0,point=never", "point='never' .* not one of"),
    ],
)
def test_malformed_specs_name_the_problem(text, message):
    with pytest.raises(FaultSpecError, match=message):
        parse_fault(text)


def test_targets_outside_the_job_are_refused():
    with pytest.raises(FaultSpecError, match="rank=4 .* outside world size 4"):
        resolve_faults([parse_fault("kill-worker@step=1,rank=4")], 2, 2)
    with pytest.raises(FaultSpecError, match="machine=2 .* outside the job's 2 machines"):
        resolve_faults([parse_fault("kill-worker@step=1,machine=2")], 2, 2)


def test_hang_fault():
    (fault,) = resolve_faults([parse_fault("hang@step=4,machine=1")], 2, 2)
    assert (fault.kind, fault.rank, fault.step) == ("hang", 2, 4)
    with pytest.raises(
        FaultSpecError, match="unknown parameter 'point'.*hang takes step, rank, machine"
    ):
        parse_fault("hang@step=4,rank=0,point=mid-save")


def test_kill_group_becomes_one_machine_fault_per_member_of_the_placement_group():
    (spec,) = [parse_fault("kill-group@step=5,group=1")]
    faults = resolve_faults([spec], machines=4, nproc_per_machine=1, replicas=2)
    assert [(f.kind, f.machine, f.step) for f in faults] == [
        ("kill-group", 2, 5),
        ("kill-group", 3, 5),
    ]
    assert faults[0].targets(2, range(2, 3)) and not faults[0].targets(0, range(0, 1))
    with pytest.raises(FaultSpecError, match=r"group=2 .* outside the placement's 2 groups"):
        resolve_faults([spec.__class__(**{**spec.__dict__, "group": 2})], 4, 1, replicas=2)
    with pytest.raises(FaultSpecError, match="needs group=G"):
        parse_fault("kill-group@step=5")


def test_corrupt_chunk_names_the_copy_it_damages():
    faults = resolve_faults(
        [
            parse_fault("corrupt-chunk@step=3,rank=1,where=flight,chunk=2"),
            parse_fault("corrupt-chunk@step=3,rank=1,where=replica"),
            parse_fault("corrupt-chunk@step=3,machine=1"),
        ],
        machines=2,
        nproc_per_machine=1,
    )
    assert [(f.rank, f.where, f.chunk) for f in faults] == [
        (1, "flight", 2),
        (1, "replica", 0),
        (1, "memory", 0),
    ]
    # the rank's own machine damages its memory and the wire; a replica is damaged by its holder
    assert faults[0].targets(1, range(1, 2)) and not faults[0].targets(0, range(0, 1))
    assert faults[1].targets(0, range(0, 1))
    with pytest.raises(FaultSpecError, match="where='ram' .* not one of memory, replica, flight"):
        parse_fault("corrupt-chunk@step=3,rank=1,where=ram")


def test_partition_cuts_off_every_agent_or_one_machine():
    (everyone,) = resolve_faults([parse_fault("partition@step=4,seconds=2")], 3, 1)
    assert (everyone.machine, everyone.seconds) == (-1, 2)
    assert all(everyone.targets(m, range(m, m + 1)) for m in range(3))
    (one,) = resolve_faults([parse_fault("partition@step=4,machine=2")], 3, 1)
    assert (one.machine, one.seconds) == (2, 3)
    assert one.targets(2, range(2, 3)) and not one.targets(1, range(1, 2))
    with pytest.raises(FaultSpecError, match="machine=3 .* outside the job's 3 machines"):
        resolve_faults([parse_fault("partition@step=4,machine=3")], 3, 1)
    with pytest.raises(FaultSpecError, match="needs step=S"):
        parse_fault("partition@seconds=2")
