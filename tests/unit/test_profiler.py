"""The trainer's collective profiler: timed collectives, idle spans per iteration, drift."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from gemini_ckpt.snapshot.profiler import (
    CollectiveTimeline,
    IterationProfiler,
    hook_ddp,
    install_collective_hooks,
)


def _iteration(profiler: IterationProfiler, timeline: CollectiveTimeline, t0: float, busy):
    for start, end in busy:
        timeline.record(t0 + start, t0 + end)
    return profiler.mark(t0 + 1.0)


def test_a_profile_comes_after_the_warm_up_and_the_profiled_iterations():
    timeline = CollectiveTimeline()
    profiler = IterationProfiler(timeline, iterations=3, warmup=1, min_span_s=0.01)
    assert profiler.mark(0.0) is None  # the first iteration starts
    reports = [_iteration(profiler, timeline, float(i), [(0.4, 0.6)]) for i in range(4)]
    assert reports[:3] == [None, None, None]  # warm-up, then two of three
    report = reports[3]
    assert report is not None
    assert report.iterations == 3
    assert report.profile.iteration_seconds == pytest.approx(1.0)
    spans = [(round(s.start, 6), round(s.length, 6)) for s in report.profile.spans]
    assert spans == [(0.0, 0.4), (0.6, 0.4)]
    assert report.max_spread == pytest.approx(0.0, abs=1e-9)
    assert len(report.spread) == 2
    assert report.to_dict()["spans"] == [[s.start, s.length] for s in report.profile.spans]
    assert not timeline.recording  # profiling over: the wrappers stop recording


def test_iterations_of_an_odd_shape_are_left_out_of_the_mean():
    timeline = CollectiveTimeline()
    profiler = IterationProfiler(timeline, iterations=3, warmup=0, min_span_s=0.01)
    profiler.mark(0.0)
    _iteration(profiler, timeline, 0.0, [(0.4, 0.6)])
    _iteration(profiler, timeline, 1.0, [(0.2, 0.3), (0.4, 0.6)])  # one more gap
    report = _iteration(profiler, timeline, 2.0, [(0.4, 0.6)])
    assert report is not None
    assert report.iterations == 2
    assert len(report.profile.spans) == 2


def test_a_drift_of_the_iteration_time_starts_a_new_profile():
    timeline = CollectiveTimeline()
    profiler = IterationProfiler(timeline, iterations=2, warmup=0, min_span_s=0.01, drift=0.2)
    profiler.mark(0.0)
    _iteration(profiler, timeline, 0.0, [(0.4, 0.6)])
    assert _iteration(profiler, timeline, 1.0, [(0.4, 0.6)]) is not None
    now = 2.0
    for _ in range(6):  # steady: watched, nothing new
        now += 1.0
        assert profiler.mark(now) is None
    assert not timeline.recording
    reports = []
    for _ in range(8):  # iterations now take 1.5 s: once the median moves past 20 %, again
        timeline.record(now + 0.5, now + 0.7)
        now += 1.5
        reports.append(profiler.mark(now))
    new = [r for r in reports if r is not None]
    assert len(new) == 1
    assert new[0].profile.iteration_seconds == pytest.approx(1.5)
    assert [(round(s.start, 6), round(s.length, 6)) for s in new[0].profile.spans] == [
        (0.0, 0.5),
        (0.7, 0.8),
    ]
    assert profiler.reports == 2


@pytest.fixture
def gloo_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_wrapped_collectives_record_their_busy_time_sync_and_async(gloo_world):
    timeline = install_collective_hooks()
    assert install_collective_hooks() is timeline  # idempotent: wrapped once
    assert hasattr(dist.all_reduce, "__gemini_timed__")
    timeline.drain()
    timeline.recording = False
    dist.all_reduce(torch.ones(4))
    assert timeline.drain() == []  # not profiling: nothing recorded
    timeline.recording = True
    try:
        dist.all_reduce(torch.ones(4))
        work = dist.all_reduce(torch.ones(4), async_op=True)
        work.wait()
        out = torch.empty(4)
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, torch.ones(4))
        assert len(timeline.drain()) == 3
        # gloo's reduce-scatter handle has no future: its end is taken when it is waited for,
        # and the handle is still a Work (FSDP2 waits only for those).
        reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        work = reduce_scatter(torch.empty(4), torch.ones(4), async_op=True)
        assert isinstance(work, dist.distributed_c10d.Work)
        assert timeline.drain() == []
        time.sleep(0.05)
        assert work.wait()
        busy = timeline.drain()
    finally:
        timeline.recording = False
    assert len(busy) == 1
    assert busy[0][1] - busy[0][0] >= 0.05


def test_only_ddp_models_get_the_all_reduce_hook(gloo_world):
    assert not hook_ddp(torch.nn.Linear(2, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    assert hook_ddp(ddp)
    assert not hook_ddp(ddp)  # DDP takes one hook: the second is refused, training goes on
