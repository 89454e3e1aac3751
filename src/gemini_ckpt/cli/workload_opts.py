"""`--workload NAME`: a built-in training script in place of SCRIPT, for `launch` and `local`.

    gemini-ckpt local --machines 4 --nproc-per-machine 1 --workload emulated -- --model gpt2-20b

The workload's own arguments follow `--`.
"""

from __future__ import annotations

import argparse
import importlib.util

from gemini_ckpt import config as cfg
from gemini_ckpt.errors import ConfigError

WORKLOADS = {"emulated": "gemini_ckpt.demo.emulated"}
"""Built-in training scripts: name -> module."""


def add_workload_option(parser: argparse.ArgumentParser) -> None:
    """Register `--workload` (its environment twin is `GEMINI_WORKLOAD`)."""
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=cfg.env_default("GEMINI_WORKLOAD", "") or None,
        help="run a built-in training script instead of SCRIPT; its arguments follow `--` "
        "(emulated: a Table 2 model's real collectives with compute as sleep; see "
        "`python -m gemini_ckpt.demo.emulated --help`)",
    )


def resolve_workload(args: argparse.Namespace) -> None:
    """Turn `--workload NAME [-- ARGS]` into the script and its arguments, in place.

    Raises:
        ConfigError: neither a script nor a workload is given, or the workload is missing.
    """
    if args.workload is None:
        if not args.script:
            raise ConfigError("a training script (or --workload NAME) is required")
        return
    spec = importlib.util.find_spec(WORKLOADS[args.workload])
    if spec is None or spec.origin is None:
        raise ConfigError(f"workload {args.workload} is not installed")
    # argparse puts the first argument after `--` into `script`.
    args.script_args = [args.script, *args.script_args] if args.script else []
    args.script = spec.origin
