"""`gemini-ckpt demo`: a trainer killed mid-run, recovered from memory, checked bit for bit.

A small GPT trains on 2 simulated machines x 2 ranks; one trainer is SIGKILLed halfway; the job
resumes from local memory and its final state is compared with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gemini_ckpt.cli.local_cmd import run_testbed
from gemini_ckpt.cli.progress import summary_lines
from gemini_ckpt.config import env_or as env
from gemini_ckpt.demo import final_state, train_gpt
from gemini_ckpt.testbed.local import LocalSpec


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `demo`."""
    p = sub.add_parser(
        "demo",
        help="kill a trainer mid-run and recover exactly (about a minute)",
        description=__doc__,
    )
    p.add_argument(
        "--steps",
        type=int,
        default=env("DEMO_STEPS", "40"),
        help="training steps (default 40)",
    )
    p.add_argument(
        "--fault",
        default=env("DEMO_FAULT", "kill-worker@step=20,rank=1"),
        help="the fault to inject (default: kill-worker@step=20,rank=1)",
    )
    p.add_argument("--machines", type=int, default=env("MACHINES", "2"))
    p.add_argument("--nproc-per-machine", type=int, default=env("NPROC_PER_MACHINE", "2"))
    p.add_argument("-o", "--output", choices=["table", "json"], default=env("OUTPUT", "table"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the job with the fault, then without, and compare the final states."""
    script = Path(train_gpt.__file__)
    world = args.machines * args.nproc_per_machine
    show = args.output == "table"
    with tempfile.TemporaryDirectory(prefix="gemini-demo-") as tmp:
        root = Path(tmp)

        def spec(name: str, faults: tuple[str, ...]) -> LocalSpec:
            return LocalSpec(
                machines=args.machines,
                nproc_per_machine=args.nproc_per_machine,
                script=script,
                faults=faults,
                run_dir=root / name,
                script_args=(
                    "--steps",
                    str(args.steps),
                    "--final-state",
                    str(root / name / "final"),
                ),
            )

        if show:
            print(
                f"== training with a fault ({args.fault}) on {args.machines} machines x "
                f"{args.nproc_per_machine} ranks",
                flush=True,
            )
        started = time.monotonic()
        code, summary, _ = run_testbed(spec("faulty", (args.fault,)), 600, show=show)
        faulty_s = time.monotonic() - started
        if show:
            print("\n".join(summary_lines(summary)))
            print("== the same training without the fault, for comparison", flush=True)
        ref_code, _, _ = run_testbed(spec("reference", ()), 600, show=False)
        problems = (
            final_state.compare_dirs(root / "reference" / "final", root / "faulty" / "final", world)
            if code == ref_code == 0
            else ["a run failed"]
        )
    identical = not problems
    if args.output == "json":
        print(
            json.dumps(
                {
                    "faulty_run_s": faulty_s,
                    "exit_codes": [code, ref_code],
                    "bit_identical": identical,
                    "differences": problems,
                    **summary.to_dict(),
                },
                indent=2,
            )
        )
    elif identical:
        print(
            f"final state of all {world} ranks (model, optimizer, LR scheduler, RNG, data "
            "position) is bit-identical to the uninterrupted run"
        )
    else:
        print("final state differs from the uninterrupted run:\n  " + "\n  ".join(problems))
    return 0 if identical else 1
