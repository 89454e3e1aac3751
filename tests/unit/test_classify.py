from gemini_ckpt.recovery.classify import IncidentKind, MemberReport, classify


def test_healthy_job():
    members = {
        0: MemberReport(True, last_step=5, last_step_at=99.0),
        1: MemberReport(True, last_step=5, last_step_at=99.5),
    }
    assert classify(100.0, members, hang_deadline_s=30, generation_started_at=0.0) is None


def test_lost_lease_is_a_machine_failure_and_wins_over_dead_trainers():
    members = {
        0: MemberReport(True, failed_ranks=[1]),
        1: MemberReport(False),
        2: MemberReport(True),
    }
    incident = classify(100.0, members, 30, 0.0)
    assert incident.kind is IncidentKind.MACHINE
    assert incident.machines == (1,)
    assert incident.replace == (1,)
    assert "membership lease of machine(s) [1] expired" in incident.reason


def test_dead_trainer_with_living_agent_is_a_software_failure():
    members = {0: MemberReport(True, failed_ranks=[1]), 1: MemberReport(True, failed_ranks=[3])}
    incident = classify(100.0, members, 30, 0.0)
    assert incident.kind is IncidentKind.SOFTWARE
    assert (incident.machines, incident.ranks) == ((0, 1), (1, 3))
    assert incident.replace == ()
    assert "trainer(s) [1, 3] died on machine(s) [0, 1]" in incident.reason


def test_no_progress_within_the_deadline_is_a_hang():
    members = {
        0: MemberReport(True, last_step=7, last_step_at=60.0),
        1: MemberReport(True, last_step=7, last_step_at=95.0),
    }
    incident = classify(100.0, members, hang_deadline_s=30, generation_started_at=0.0)
    assert incident.kind is IncidentKind.HANG
    assert incident.machines == (0,)
    assert "machine 0: 40.0 s since step 7" in incident.reason


def test_startup_gets_the_full_deadline():
    members = {0: MemberReport(True), 1: MemberReport(True, last_step=3, last_step_at=10.0)}
    assert classify(100.0, members, 30, generation_started_at=80.0) is None
    incident = classify(111.0, members, 30, generation_started_at=80.0)
    assert incident.kind is IncidentKind.HANG
    assert incident.machines == (0, 1)


def test_the_first_step_of_a_generation_is_held_to_the_startup_deadline():
    # Machine 0 has not stepped since the generation began at 80; machine 1 stepped at 90.
    members = {
        0: MemberReport(True, last_step=3, last_step_at=10.0),
        1: MemberReport(True, last_step=4, last_step_at=90.0),
    }
    quiet = classify(115.0, members, 5, generation_started_at=80.0, startup_deadline_s=60)
    assert quiet is not None and quiet.machines == (1,)
    assert "machine 1: 25.0 s since step 4 (deadline 5 s)" in quiet.reason
    late = classify(141.0, {0: members[0]}, 5, generation_started_at=80.0, startup_deadline_s=60)
    assert late is not None and late.machines == (0,)
    assert "61.0 s since the generation's start (deadline 60 s)" in late.reason
    assert classify(139.0, {0: members[0]}, 5, 80.0, startup_deadline_s=60) is None
