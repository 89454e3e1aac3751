"""Does checkpoint traffic cost training throughput? The paper's Figs 7, 8 and 16 on the test bed.

Runs the emulated-accelerator workload (`gemini_ckpt.demo.emulated`: a Table 2 model's real gloo
collectives, compute as sleep) or, with `--workload deepspeed`, the demo GPT under real DeepSpeed
ZeRO-3 (`examples/deepspeed_gpt`, real compute on the CPU) on N machines x 1 rank, each in its
own network namespace behind a rate-capped link (`--netns --link-bandwidth`), once per mode:

    none        no Checkpointer at all (the baseline)
    local       save every iteration into local memory only (--replicas 1): what the snapshot
                itself costs, with no checkpoint traffic on the network
    blocking    save, then wait until the step is committed and on every peer
    naive       save every iteration; replication starts as soon as the snapshot is committed
    nopipe      --interleave --interleave-sub-buffers 1 (one buffer: no pipelining)
    interleave  --interleave (Algorithm 2, p sub-buffers)

Per mode: the median and min iteration time over the measured iterations (after warm-up and the
profiling iterations) and its ratio to `none` (per repeat, then min and median over repeats); the
network's idle time per iteration, from the collectives' issue and completion times the trainer
records (training traffic only; DeepSpeed runs report the idle time of the profile the agents
scheduled with instead); the checkpoint time per iteration, from the agents' `replicated` events
(measured, not computed); and, from the same events, which measured steps every peer holds, per
rank, counted, not assumed.

    python benchmarks/bench_interleave.py --repeats 3 --out bench-results/interleave
    python benchmarks/bench_interleave.py --workload deepspeed --modes none,local,naive,interleave
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from gemini_ckpt.config import parse_rate, use_torch_extensions_dir
from gemini_ckpt.demo import emulated
from gemini_ckpt.observability import events as ev
from gemini_ckpt.observability.events import read_events
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

SCRIPT = Path(emulated.__file__)
DEEPSPEED_SCRIPT = Path(__file__).parents[1] / "examples" / "deepspeed_gpt" / "train.py"
SHM = Path("/dev/shm")
MODES = {
    "none": ("none", ()),
    "local": ("gemini", ("--replicas", "1")),
    "blocking": ("blocking", ()),
    "naive": ("gemini", ()),
    "nopipe": ("gemini", ("--interleave", "--interleave-sub-buffers", "1")),
    "interleave": ("gemini", ("--interleave",)),
}
"""Mode -> (the trainer's --checkpoint, extra agent options)."""


def job_spec(model: str, mode: str, args: argparse.Namespace, run_dir: Path) -> LocalSpec:
    """The test-bed job of one run."""
    checkpoint, interleave = MODES[mode]
    steps = ["--steps", str(args.warmup + args.profile_iterations + args.iterations)]
    steps += ["--timings", str(run_dir / "timings")]
    if args.workload == "deepspeed":
        script = DEEPSPEED_SCRIPT
        script_args = [*deepspeed_args(args), "--checkpoint", checkpoint, *steps]
    else:
        script = SCRIPT
        script_args = ["--model", model, "--parallel", args.parallel, "--checkpoint", checkpoint]
        script_args += steps
        scale = args.scale or target_scale(model, args)
        if scale:
            script_args += ["--scale", str(scale)]
        if args.layers:
            script_args += ["--layers", str(args.layers)]
        if args.compute_ms:
            script_args += ["--compute-ms", str(args.compute_ms)]
    agent_args: tuple[str, ...] = interleave
    if "--interleave" in interleave:
        agent_args += ("--profile-iterations", str(args.profile_iterations))
        agent_args += ("--interleave-buffer", args.interleave_buffer)
        agent_args += ("--interleave-margin", str(args.margin))
        # The links are capped at --link-bandwidth; TCP gets a little less through htb, and a
        # cost model that assumes the full rate queues chunks into the next collective.
        goodput = parse_rate(args.link_bandwidth) * args.goodput
        agent_args += ("--link-bandwidth", f"{int(goodput)}bit")
    return LocalSpec(
        machines=args.machines,
        nproc_per_machine=1,
        script=script,
        script_args=tuple(script_args),
        run_dir=run_dir,
        max_restarts=0,
        netns=not args.loopback,
        link_bandwidth=args.link_bandwidth,
        agent_args=agent_args,
        # Chunks are the smallest unit a paced push sends: small enough for the idle gaps.
        env={"GEMINI_CHUNK_SIZE": args.chunk_size},
    )


def deepspeed_args(args: argparse.Namespace) -> list[str]:
    """The DeepSpeed example's model options (ZeRO-3, torch AdamW)."""
    shape = ["--zero-stage", "3", "--d-model", str(args.d_model), "--layers", str(args.layers or 4)]
    return [*shape, "--batch", str(args.batch), "--seq", str(args.seq)]


def deepspeed_workload(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict:
    """The DeepSpeed model's size, and the bytes each rank pushed per step (its partition)."""
    from gemini_ckpt.demo.data import VOCAB
    from gemini_ckpt.demo.model import GPTConfig, TinyGPT

    layers = args.layers or 4
    config = GPTConfig(len(VOCAB), args.seq, args.d_model, layers, max(1, args.d_model // 32))
    pushed = [
        r["replication"]["bytes_per_push"] for rs in runs.values() for r in rs if "replication" in r
    ]
    return {
        "zero_stage": 3,
        "d_model": args.d_model,
        "layers": layers,
        "parameters": sum(p.numel() for p in TinyGPT(config).parameters()),
        "checkpoint_bytes_per_rank": statistics.median(pushed) if pushed else None,
    }


def target_scale(model: str, args: argparse.Namespace) -> int:
    """The scale that leaves `model` (with `--layers`) about `--target-params` parameters."""
    if not args.target_params:
        return 0
    full = emulated.make_plan(_trainer_args(args, model, scale=1), args.machines).parameters()
    return max(1, round(full / args.target_params))


def iteration_records(run_dir: Path, machines: int, first: int) -> dict[int, list[dict[str, Any]]]:
    """Step -> every rank's timing record of it, for steps >= `first`."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for rank in range(machines):
        for line in (run_dir / "timings" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["step"] >= first:
                by_step.setdefault(record["step"], []).append(record)
    return by_step


def replication(records: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """From the agents' events: checkpoint seconds per push, and the measured steps each peer holds.

    A peer holds a step of a rank if it verified and committed a push of that very step (the
    agent skips a step the trainer overwrote before it was sent: such a step counts as missing).
    """
    pushes = [e for e in records if e["event"] == ev.REPLICATED and int(e["step"]) in set(steps)]
    per_pair: dict[str, set[int]] = {}
    for e in pushes:
        per_pair.setdefault(f"rank {e['rank']} -> machine {e['peer']}", set()).add(int(e["step"]))
    # A paced push's wall time includes its waits for idle windows; the checkpoint time is the
    # time its bytes were on the way.
    seconds = [float(e["seconds"]) - float(e.get("paced_s", 0.0)) for e in pushes]
    wall = [float(e["seconds"]) for e in pushes]
    return {
        "pushes": len(pushes),
        "steps_per_pair": {pair: len(got) for pair, got in sorted(per_pair.items())},
        "missing_per_pair": {
            pair: sorted(set(steps) - got) for pair, got in sorted(per_pair.items())
        },
        # None without peers (local): nothing to count
        "every_step_replicated": all(set(steps) <= got for got in per_pair.values())
        if per_pair
        else None,
        "checkpoint_s": _stats(seconds),
        "push_wall_s": _stats(wall),
        "bytes_per_push": statistics.median(int(e["nbytes"]) for e in pushes) if pushes else 0,
    }


def local_copy(records: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """From the commits: how long each background copy took, and how long it waited first.

    A copy waits (`deferred_s`) for the first idle span that holds it once the trainer has its
    profile; each machine's `progress` event carries one rank's timing.
    """
    measured = set(steps)
    timings = [e for e in records if e["event"] == ev.PROGRESS and int(e["step"]) in measured]
    return {
        "copy_s": _stats([float(e.get("copy_s", 0.0)) for e in timings]),
        "deferred_s": _stats([float(e.get("deferred_s", 0.0)) for e in timings]),
    }


def run_once(model: str, mode: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One job: its measured iterations, idle time and replication evidence."""
    spec = job_spec(model, mode, args, run_dir)
    load = os.getloadavg()[0]
    with LocalTestbed(spec) as bed:
        code = bed.wait(args.timeout)
    if code != 0:
        raise RuntimeError(f"{model} {mode} run failed (exit code {code}); logs in {run_dir}")
    first = args.warmup + args.profile_iterations + 1
    by_step = iteration_records(run_dir, args.machines, first)
    steps = sorted(by_step)
    durations = [max(r["duration"] for r in by_step[s]) for s in steps]
    idle = [
        statistics.fmean(r["idle_s"] for r in by_step[s])
        for s in steps
        if all("idle_s" in r for r in by_step[s])
    ]
    out: dict[str, Any] = {
        "load_average_before": load,
        "steps": steps,
        "iteration_s": _stats(durations),
        "idle_s": _stats(idle),
    }
    if mode != "none":
        records = read_events(bed.event_files())
        out["replication"] = replication(records, steps)
        out["local_copy"] = local_copy(records, steps)
        if "--interleave" in MODES[mode][1]:
            out["profile"] = profile_stability(records)
            if not idle:  # the trainer did not record its collectives: the profile's idle time
                out["idle_s"] = {"median": out["profile"]["idle_s"], "source": "profile"}
    return out


def profile_stability(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The profiles the trainers took: idle spans, schedule, and how stable each span was.

    A span's spread is the standard deviation of its length across the profiled iterations over
    its mean (the paper: under 10 %).
    """
    schedules = [e for e in records if e["event"] == ev.INTERLEAVE_SCHEDULE]
    spreads = [v for e in schedules for values in e["spread"].values() for v in values]
    return {
        "schedules": len(schedules),
        "spans": statistics.median(len(e["spans"]) for e in schedules) if schedules else 0,
        "idle_s": statistics.median(e["idle_s"] for e in schedules) if schedules else 0.0,
        "interval": max((e["interval"] or 0 for e in schedules), default=None),
        "spread_median": statistics.median(spreads) if spreads else None,
        "spread_max": max(spreads, default=None),
    }


def _or_dash(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _stats(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {"median": statistics.median(samples), "min": min(samples), "n": len(samples)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per mode: iteration and idle medians, ratio to `none` per repeat (min, median)."""
    out: dict[str, Any] = {}
    for mode, repeats in runs.items():
        ratios = [
            run["iteration_s"]["median"] / base["iteration_s"]["median"]
            for run, base in zip(repeats, runs["none"], strict=True)
        ]
        entry: dict[str, Any] = {
            "iteration_s_median": statistics.median(r["iteration_s"]["median"] for r in repeats),
            "iteration_s_min": min(r["iteration_s"]["min"] for r in repeats),
            "ratio_to_none": {"min": min(ratios), "median": statistics.median(ratios)},
        }
        idle = [r["idle_s"]["median"] for r in repeats if r["idle_s"]]
        entry["idle_s_median"] = statistics.median(idle) if idle else None
        profiles = [r["profile"] for r in repeats if "profile" in r]
        if profiles:
            entry["profile_spread_median"] = statistics.median(
                p["spread_median"] for p in profiles if p["spread_median"] is not None
            )
            entry["interval"] = max(p["interval"] or 0 for p in profiles)
        reps = [r["replication"] for r in repeats if "replication" in r]
        if reps:
            ckpt = [r["checkpoint_s"]["median"] for r in reps if r["checkpoint_s"]]
            entry["checkpoint_s_median"] = statistics.median(ckpt) if ckpt else None
            counted = [r["every_step_replicated"] for r in reps]
            entry["every_step_replicated"] = None if None in counted else all(counted)
        out[mode] = entry
    return out


def figures(report: dict[str, Any], out: Path) -> list[str]:
    """Fig 7/16-style iteration times and Fig 8-style idle vs checkpoint time, one PNG per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model, summary in report["summary"].items():
        modes = list(summary)
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.bar(modes, [summary[m]["iteration_s_median"] for m in modes], color="tab:blue")
        left.set_ylabel("iteration time, median (s)")
        left.set_title(f"{model}: iteration time by mode")
        # not measured (DeepSpeed without a profile): no bar rather than a zero
        idle = [summary[m]["idle_s_median"] or float("nan") for m in modes]
        ckpt = [summary[m].get("checkpoint_s_median") or 0.0 for m in modes]
        xs = range(len(modes))
        right.bar([x - 0.2 for x in xs], idle, width=0.4, label="network idle (training)")
        right.bar([x + 0.2 for x in xs], ckpt, width=0.4, label="checkpoint push (measured)")
        right.set_xticks(list(xs), modes)
        right.set_ylabel("seconds per iteration")
        right.set_title("idle time vs checkpoint time")
        right.legend()
        fig.tight_layout()
        path = out / f"{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def table(report: dict[str, Any]) -> list[str]:
    """Markdown: per model and mode, iteration time, ratio to none, idle and checkpoint time."""
    lines = [
        "| model | mode | iteration s, median (min) | / none, median (min) | idle s | ckpt s "
        "| every step replicated |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, summary in report["summary"].items():
        for mode, s in summary.items():
            ckpt, idle = s.get("checkpoint_s_median"), s["idle_s_median"]
            lines.append(
                f"| {model} | {mode} | {s['iteration_s_median']:.3f} ({s['iteration_s_min']:.3f})"
                f" | {s['ratio_to_none']['median']:.3f} ({s['ratio_to_none']['min']:.3f})"
                f" | {_or_dash(idle, '.3f')} | {_or_dash(ckpt, '.3f')}"
                f" | {_or_dash(s.get('every_step_replicated'))} |"
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=("emulated", "deepspeed"), default="emulated")
    p.add_argument("--models", default="gpt2-10b,gpt2-20b", help="emulated: Table 2 models")
    p.add_argument("--d-model", type=int, default=256, help="deepspeed: the demo GPT's width")
    p.add_argument("--batch", type=int, default=8, help="deepspeed: micro-batch per rank")
    p.add_argument("--seq", type=int, default=64, help="deepspeed: sequence length")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--parallel", default="zero3", choices=["zero3", "dp"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machines", type=int, default=4)
    p.add_argument("--iterations", type=int, default=20, help="measured iterations per run")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="iterations before profiling (the profiler skips 2 of its own: keep >= 2)",
    )
    p.add_argument("--profile-iterations", type=int, default=20)
    p.add_argument("--scale", type=int, default=0, help="0: the model's default")
    p.add_argument(
        "--layers", type=int, default=0, help="transformer layers kept (0: all; deepspeed: 4)"
    )
    p.add_argument(
        "--target-params",
        type=float,
        default=0,
        help="without --scale: scale each model to about this many parameters",
    )
    p.add_argument("--compute-ms", type=float, default=0.0, help="0: from the model's FLOPs")
    p.add_argument("--link-bandwidth", default="500mbit")
    p.add_argument("--interleave-buffer", default="4MiB", help="R (p = 4 unless nopipe)")
    p.add_argument("--margin", type=float, default=0.8, help="mu, the share of each span used")
    p.add_argument(
        "--goodput",
        type=float,
        default=0.9,
        help="the schedule's B as a fraction of the link cap (TCP's share of an htb rate)",
    )
    p.add_argument("--chunk-size", default="1MiB", help="the trainers' checkpoint chunk size")
    p.add_argument("--loopback", action="store_true", help="no network namespaces (no cap)")
    p.add_argument("--quick", action="store_true", help="smoke: 1 small model, 2 modes, few steps")
    p.add_argument("--timeout", type=float, default=600.0, help="per job, seconds")
    p.add_argument("--work-dir", default="", help="keep run directories here")
    p.add_argument("--out", default="bench-results/interleave", help="directory for results")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.modes, args.repeats = "gpt2-10b", "none,interleave", 1
        # Enough profiled iterations for a usable profile, enough measured ones for every peer
        # to get a step even when the schedule spreads a checkpoint over two iterations.
        args.iterations, args.warmup, args.profile_iterations = 6, 2, 4
        args.scale, args.compute_ms = args.scale or 512, args.compute_ms or 300.0
        args.layers = args.layers or 6
    modes = args.modes.split(",")
    if "none" not in modes or set(modes) - set(MODES):
        p.error(f"--modes must include none and come from {', '.join(MODES)}")
    if args.workload == "deepspeed":
        if "blocking" in modes:
            p.error("--workload deepspeed has no blocking mode (the example does not wait)")
        args.models = f"zero3-d{args.d_model}-l{args.layers or 4}"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write results.json and the figures, print a table; return the report."""
    args = parse_args(argv)
    if args.workload == "deepspeed":
        use_torch_extensions_dir()  # the trainers inherit it: DeepSpeed's ops compile once
    shm_before = set(SHM.glob("deepspeed_*"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gemini-bench-interleave-"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in args.models.split(","):
        runs[model] = {mode: [] for mode in args.modes.split(",")}
        for repeat in range(args.repeats):  # modes interleaved, so host noise spreads over all
            for mode in runs[model]:
                run = run_once(model, mode, args, work / f"{model}-{mode}-{repeat}")
                runs[model][mode].append(run)
                print(
                    f"{model} {mode} #{repeat}: iteration {run['iteration_s']['median']:.3f} s,"
                    f" idle {_or_dash(run['idle_s'].get('median'), '.3f')} s",
                    flush=True,
                )
    for path in (
        set(SHM.glob("deepspeed_*")) - shm_before
    ):  # DeepSpeed's CPU all-reduce leaves these
        path.unlink(missing_ok=True)
    report: dict[str, Any] = {
        "benchmark": "interleave",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": version("torch"),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "workload": {
            m: deepspeed_workload(args, by_mode)
            if args.workload == "deepspeed"
            else emulated_workload(args, m)
            for m, by_mode in runs.items()
        },
        "runs": runs,
        "summary": {model: summarize(by_mode) for model, by_mode in runs.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = figures(report, out)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    for line in table(report):
        print(line)
    return report


def emulated_workload(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The emulated model's size, traffic and compute per rank."""
    plan = emulated.make_plan(_trainer_args(args, model), args.machines)
    return {
        "parameters": plan.parameters(),
        "scale": plan.scale,
        "checkpoint_bytes_per_rank": plan.checkpoint_bytes(),
        "training_bytes_sent_per_rank": plan.wire_bytes(),
        "compute_s": plan.compute_seconds(),
    }


def _trainer_args(
    args: argparse.Namespace, model: str, scale: int | None = None
) -> argparse.Namespace:
    if scale is None:
        scale = args.scale or target_scale(model, args)
    argv = ["--model", model, "--parallel", args.parallel, "--scale", str(scale)]
    argv += ["--layers", str(args.layers)]
    return emulated.parse_args([*argv, "--compute-ms", str(args.compute_ms)])


if __name__ == "__main__":
    main()
