"""`gemini-ckpt local`: a whole job on this host, N simulated machines, each with its own agent."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gemini_ckpt.cli.interleave_opts import interleave_settings
from gemini_ckpt.cli.launch_cmd import add_common_options
from gemini_ckpt.cli.progress import event_line, summary_lines
from gemini_ckpt.cli.workload_opts import resolve_workload
from gemini_ckpt.config import env_or as env
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.observability.summary import RunSummary
from gemini_ckpt.store.files import parse_location
from gemini_ckpt.testbed import netns
from gemini_ckpt.testbed.local import LocalSpec, LocalTestbed

TIMED_OUT = 124
"""Exit code of a job stopped by --timeout (as timeout(1) uses)."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `local`."""
    p = sub.add_parser(
        "local", help="run a job on N simulated machines on this host", description=__doc__
    )
    p.add_argument(
        "--machines",
        type=int,
        default=env("MACHINES", "2"),
        help="simulated machines (default 2)",
    )
    p.add_argument(
        "--nproc-per-machine",
        type=int,
        default=env("NPROC_PER_MACHINE", "2"),
        help="trainer processes per machine (default 2)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=env("TIMEOUT", "3600"),
        help="give up after this many seconds",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=env("OUTPUT", "table"),
        help="summary format",
    )
    p.add_argument(
        "--etcd",
        default=env("ETCD", ""),
        help="use this etcd cluster, HOST:PORT[,...] (default: a private one per job)",
    )
    p.add_argument(
        "--etcd-members",
        type=int,
        default=env("ETCD_MEMBERS", "1"),
        help="members of the private etcd (3: survives losing one)",
    )
    p.add_argument(
        "--standby",
        type=int,
        default=env("STANDBY", "0"),
        help="warm standby agents kept waiting to replace lost machines (default 0)",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        default=env("NETNS", "") == "1",
        help="put each machine in its own network namespace, cabled to one switch (root only)",
    )
    p.add_argument(
        "--cleanup",
        action=_Cleanup,
        help="remove every namespace --netns test beds left behind (also running ones) and exit",
    )
    add_common_options(p)
    p.set_defaults(run=run)


class _Cleanup(argparse.Action):
    """Acts while parsing, so `gemini-ckpt local --cleanup` needs no training script."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        try:
            removed = netns.remove_stale_networks()
        except ConfigError as e:
            parser.exit(2, f"gemini-ckpt local --cleanup: {e}\n")
        print(f"removed {len(removed)} namespace(s): {' '.join(removed) or '-'}")
        parser.exit(0)


def spec_from_args(args: argparse.Namespace, **overrides: object) -> LocalSpec:
    """The test bed spec the options describe."""
    resolve_workload(args)
    fields: dict[str, object] = {
        "machines": args.machines,
        "nproc_per_machine": args.nproc_per_machine,
        "script": Path(args.script),
        "script_args": tuple(args.script_args),
        "faults": tuple(args.fault),
        "fault_seed": args.fault_seed,
        "memory_limit": args.memory_limit,
        "snapshot_mode": args.snapshot_mode,
        "max_restarts": args.max_restarts,
        "stop_grace_s": args.stop_grace,
        "tee": args.tee,
        "run_dir": Path(args.run_dir) if args.run_dir else None,
        "persist_dir": parse_location(args.persist_dir),
        "persist_every": args.persist_every,
        "persist_interval_s": args.persist_interval,
        "hang_timeout_s": args.hang_timeout,
        "startup_timeout_s": args.startup_timeout,
        "etcd": args.etcd,
        "member_ttl_s": args.member_ttl,
        "etcd_members": args.etcd_members,
        "standby": args.standby,
        "replicas": args.replicas,
        "netns": args.netns,
        "link_bandwidth": args.link_bandwidth,
        "agent_args": _interleave_args(args),
    }
    fields.update(overrides)
    return LocalSpec(**fields)  # type: ignore[arg-type]


def _interleave_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The agents' interleaving options (checked here, so a bad one fails before anything runs)."""
    if interleave_settings(args) is None:
        return ()
    return (
        "--interleave",
        "--interleave-buffer",
        args.interleave_buffer,
        "--interleave-sub-buffers",
        str(args.interleave_sub_buffers),
        "--interleave-margin",
        str(args.interleave_margin),
        "--link-latency",
        str(args.link_latency),
        "--profile-iterations",
        str(args.profile_iterations),
    )


def run_testbed(
    spec: LocalSpec, timeout_s: float, show: bool = True
) -> tuple[int, RunSummary, LocalTestbed]:
    """Run a job on the test bed, printing progress lines as events arrive."""
    with LocalTestbed(spec) as bed:
        if show:
            print(f"run dir {bed.run_dir} (events, worker logs)", flush=True)
        deadline = time.monotonic() + timeout_s
        code: int | None = None
        while code is None:
            for event in bed.tail.new_events():
                line = event_line(event)
                if line and show:
                    print(line, flush=True)
            code = bed.poll()
            if code is None and time.monotonic() > deadline:
                print(f"timed out after {timeout_s:.0f} s; stopping the job", file=sys.stderr)
                code = TIMED_OUT
                break
            time.sleep(0.1)
        for event in bed.tail.new_events():
            line = event_line(event)
            if line and show:
                print(line, flush=True)
    return code, bed.summary(), bed


def run(args: argparse.Namespace) -> int:
    """Run the job and print its recovery summary."""
    code, summary, bed = run_testbed(
        spec_from_args(args), args.timeout, show=args.output == "table"
    )
    if args.output == "json":
        print(
            json.dumps(
                {"exit_code": code, "run_dir": str(bed.run_dir), **summary.to_dict()}, indent=2
            )
        )
    else:
        print("\n".join(summary_lines(summary)))
        if code:
            print(f"job failed (exit code {code}); agent logs: {bed.run_dir}/m*/agent.log")
    if code == TIMED_OUT:
        return TIMED_OUT
    return 0 if code == 0 else 1
