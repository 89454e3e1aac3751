"""`gemini-ckpt`: the command line. Parsing and printing only; every command calls library code.

Each command lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
Exit codes: 0 success, 1 operational failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

from gemini_ckpt import __version__
from gemini_ckpt.errors import ConfigError, GeminiError

_COMMAND_MODULES = (
    "gemini_ckpt.cli.launch_cmd",
    "gemini_ckpt.cli.local_cmd",
    "gemini_ckpt.cli.demo_cmd",
    "gemini_ckpt.cli.simulate_cmd",
    "gemini_ckpt.cli.recommend_cmd",
    "gemini_ckpt.cli.placement_cmd",
    "gemini_ckpt.cli.etcd_cmd",
    "gemini_ckpt.cli.status_cmd",
    "gemini_ckpt.cli.export_cmd",
)


def _commands() -> list[ModuleType]:
    return [importlib.import_module(name) for name in _COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="gemini-ckpt",
        description="Per-iteration in-memory checkpoints and fast failure recovery for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gemini-ckpt {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="library log level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _commands():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gemini-ckpt` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"gemini-ckpt: error: {e}", file=sys.stderr)
        return 2
    except GeminiError as e:
        print(f"gemini-ckpt: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gemini-ckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gemini-ckpt status | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
