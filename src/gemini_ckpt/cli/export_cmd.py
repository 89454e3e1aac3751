"""`gemini-ckpt export`: one persisted step as torch.distributed.checkpoint (DCP) checkpoints.

With `--format deepspeed`, a ZeRO-3 job's step becomes a checkpoint in DeepSpeed's own layout
(OUT/latest, OUT/global_step<N>/zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt) that
`engine.load_checkpoint(OUT)` reads; that needs the `deepspeed` extra.

Reads a job's persistent tier (`--persist-dir` and `--run-id` as given to `launch`), verifies every
chunk of each rank's copy against its checksum, and writes OUT/rank-<r>/, a single-process DCP
checkpoint of that rank's whole training state (model, optimizers, LR scheduler, extra state, RNG
states), plus OUT/export.json, the record of what was exported. The default step is the newest one
every rank holds. A failed export leaves nothing under OUT; the persistent tier is only read.
Every flag has a GEMINI_* environment twin.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from gemini_ckpt.config import env_default
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.export.dcp_format import NOTES
from gemini_ckpt.export.exporter import RECORD, export_step
from gemini_ckpt.export.selection import ExportRequest
from gemini_ckpt.store.files import parse_location

_LOAD_EXAMPLE = """\
load a rank's state (DCP fills the entries of a template, here model and optimizer):
  import torch.distributed.checkpoint as dcp
  state = {"model": model.state_dict(), "optimizers": [optimizer.state_dict()]}
  dcp.load(state, checkpoint_id="OUT/rank-0")
  model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizers"][0])
(an optimizer's state_dict() has entries only after its first step)
"""


def parse_ranks(text: str) -> tuple[int, ...]:
    """`0,1,3` -> (0, 1, 3); argparse reports a bad value as a usage error."""
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ranks must be integers separated by commas, like 0,1; got {text!r}"
        ) from None
    if min(ranks) < 0 or len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"ranks must be distinct and >= 0; got {text!r}")
    return ranks


def _epilog() -> str:
    notes = "".join(
        textwrap.fill(
            note, 96, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False
        )
        + "\n"
        for note in NOTES
    )
    return f"{_LOAD_EXAMPLE}\nwhat DCP keeps (also in export.json):\n{notes}"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `export`."""
    p = sub.add_parser(
        "export",
        help="convert a persisted step to torch.distributed.checkpoint (DCP) format",
        description=__doc__,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    persist = env_default("GEMINI_PERSIST_DIR")
    p.add_argument(
        "--persist-dir",
        default=persist,
        required=persist is None,
        help="the persistent tier the job wrote to: a directory or an fsspec URL "
        "(env GEMINI_PERSIST_DIR)",
    )
    p.add_argument(
        "--run-id",
        default=env_default("GEMINI_RUN_ID", "gemini"),
        help="the job, as given to launch (default: gemini, launch's default) (env GEMINI_RUN_ID)",
    )
    p.add_argument(
        "--step",
        type=int,
        default=env_default("GEMINI_EXPORT_STEP"),
        help="the step to export (default: the newest every exported rank holds) "
        "(env GEMINI_EXPORT_STEP)",
    )
    p.add_argument(
        "--ranks",
        type=parse_ranks,
        default=env_default("GEMINI_EXPORT_RANKS"),
        metavar="R[,R...]",
        help="the ranks to export (default: all; the step must then be complete) "
        "(env GEMINI_EXPORT_RANKS)",
    )
    out = env_default("GEMINI_EXPORT_OUT")
    p.add_argument(
        "--out",
        default=out,
        required=out is None,
        help="the directory to create (env GEMINI_EXPORT_OUT)",
    )
    p.add_argument(
        "--format",
        choices=("dcp", "deepspeed"),
        default=env_default("GEMINI_EXPORT_FORMAT", "dcp"),
        help="dcp: one DCP checkpoint per rank (default); deepspeed: a ZeRO-3 job's step in "
        "DeepSpeed's checkpoint layout, for engine.load_checkpoint (env GEMINI_EXPORT_FORMAT)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        default=(env_default("GEMINI_EXPORT_FORCE") or "").lower() in {"1", "true", "yes", "on"},
        help="replace OUT if it is not empty (env GEMINI_EXPORT_FORCE=1)",
    )
    p.set_defaults(run=run)


def _location(text: str) -> str | Path:
    location = parse_location(text)
    if location is None:
        raise ConfigError("--persist-dir must name the persistent tier")
    return location


def run(args: argparse.Namespace) -> int:
    """Export the step and print one line per rank."""
    request = ExportRequest(
        persist_dir=_location(args.persist_dir),
        job=args.run_id,
        out=Path(args.out),
        step=args.step,
        ranks=args.ranks,
        force=args.force,
    )
    if args.format == "deepspeed":
        return _run_deepspeed(request)
    result = export_step(request)
    print(f"job {result.job}: {result.reason}; world size {result.world_size}")
    for rank in result.ranks:
        print(
            f"rank {rank.rank}: step {result.step} -> {result.out / rank.path} "
            f"({rank.tensors} tensors, {rank.values} other values, "
            f"{rank.chunks_verified} chunks verified)"
        )
    print(f"record: {result.out / RECORD}")
    return 0


def _run_deepspeed(request: ExportRequest) -> int:
    try:
        from gemini_ckpt.integrations.deepspeed.layout import export_deepspeed
    except ImportError as e:
        raise ConfigError(
            f"--format deepspeed needs DeepSpeed (pip install gemini-ckpt[deepspeed]): {e}"
        ) from e
    result = export_deepspeed(request)
    print(f"job {result.job}: {result.reason}; world size {result.world_size}")
    print(f"step {result.step} -> {result.out / result.tag} (DeepSpeed ZeRO-3 layout)")
    print(f"load with engine.load_checkpoint({str(result.out)!r}) on {result.world_size} ranks")
    return 0
