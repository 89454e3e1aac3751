import threading
import time

import pytest

from gemini_ckpt.coordination.job import JobCoordinator, WaitAborted
from gemini_ckpt.coordination.kv import MemoryKV
from gemini_ckpt.errors import CoordinationError


def pair():
    kv = MemoryKV()
    return (
        kv,
        JobCoordinator(kv, "job", 2, poll_s=0.001),
        JobCoordinator(kv, "job", 2, poll_s=0.001),
    )


def test_join_is_a_barrier():
    _, a, b = pair()
    t = threading.Thread(target=a.join, args=(0, 5.0))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    b.join(1, 5.0)
    t.join(5.0)
    assert not t.is_alive()
    assert a.generation() == 0


def test_join_times_out_naming_what_it_waited_for():
    _, a, _ = pair()
    with pytest.raises(CoordinationError, match="all 2 machines to join"):
        a.join(0, 0.05)


def test_concurrent_restart_requests_move_one_generation():
    _, a, b = pair()
    assert a.request_restart(0, 0, {"failures": ["rank 1"]}) == 1
    assert b.request_restart(1, 0, {"failures": ["rank 3"]}) == 1
    assert set(a.restart_reasons(1)) == {0, 1}


def test_plan_and_inventories():
    _, a, b = pair()
    a.publish_inventory(1, 0, {0: [3, 4]})
    with pytest.raises(CoordinationError, match="inventories of generation 1"):
        a.inventories(1, 0.02, lambda: None)
    b.publish_inventory(1, 1, {1: [4]})
    assert a.inventories(1, 1.0, lambda: None) == {0: {0: [3, 4]}, 1: {1: [4]}}
    a.publish_plan(1, {"step": 4}, {"addr": "127.0.0.1", "port": 1})
    assert b.plan(1, 1.0, lambda: None) == ({"step": 4}, {"addr": "127.0.0.1", "port": 1})
    b.wait_complete(1, 4, 0.01, lambda: None)  # the plan's step is complete from the start


def test_step_completes_when_every_machine_reports_and_old_keys_go():
    kv, a, b = pair()
    for step in (1, 2, 3, 4):
        a.report_committed(0, step, machine=0)
        with pytest.raises(CoordinationError):
            a.wait_complete(0, step, 0.005, lambda: None)
        b.report_committed(0, step, machine=1)
        a.wait_complete(0, step, 0.1, lambda: None)
    remaining = sorted(k[len("gemini/job/gen0/") :] for k in kv._data if "/gen0/" in k)
    assert remaining == [
        "committed/3/m0",
        "committed/3/m1",
        "committed/4/m0",
        "committed/4/m1",
        "complete/3",
        "complete/4",
    ]


def test_a_report_sent_twice_counts_its_machine_once():
    # etcd failed mid-call ("may or may not have been applied") and the report was sent again:
    # the step must still wait for the other machine.
    _, a, b = pair()
    a.report_committed(0, 7, machine=0)
    a.report_committed(0, 7, machine=0)
    with pytest.raises(CoordinationError):
        a.wait_complete(0, 7, 0.005, lambda: None)
    b.report_committed(0, 7, machine=1)
    a.wait_complete(0, 7, 0.1, lambda: None)


def test_waits_abort_when_the_job_moves_on():
    _, a, _ = pair()
    with pytest.raises(WaitAborted, match="generation 2 replaced"):
        a.wait_complete(1, 5, 5.0, lambda: "generation 2 replaced 1")


def test_job_failure_and_done():
    _, a, b = pair()
    a.mark_done(0, 0)
    assert not a.all_done(0)
    b.mark_done(0, 1)
    assert a.all_done(0)
    assert a.failure() is None
    b.fail_job("restart limit reached")
    a.fail_job("second reason is ignored")
    assert a.failure() == "restart limit reached"


def test_a_step_settles_as_complete_or_skipped():
    _, a, b = pair()
    a.report_committed(0, 3, machine=0)
    b.report_committed(0, 3, machine=1)
    assert a.wait_settled(0, 3, 0.1, lambda: None) == "complete"
    a.report_committed(0, 4, machine=0)
    b.report_skipped(0, 4)
    assert a.wait_settled(0, 4, 0.1, lambda: None) == "skipped"
