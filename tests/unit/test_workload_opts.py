"""`--workload NAME [-- ARGS]` becomes the built-in script and its arguments."""

import argparse
from pathlib import Path

import pytest

from gemini_ckpt.cli.workload_opts import add_workload_option, resolve_workload
from gemini_ckpt.demo import emulated
from gemini_ckpt.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_workload_option(p)
    p.add_argument("--machines")
    p.add_argument("script", nargs="?")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    resolve_workload(args)
    return args


def test_workload_arguments_after_the_separator_go_to_the_workload():
    args = parse(["--machines", "4", "--workload", "emulated", "--", "--model", "gpt2-20b"])
    assert Path(args.script) == Path(emulated.__file__)
    assert args.script_args == ["--model", "gpt2-20b"]
    assert parse(["--workload", "emulated"]).script_args == []


def test_a_script_still_works_and_one_of_the_two_is_required():
    args = parse(["train.py", "--lr", "1"])
    assert (args.script, args.script_args) == ("train.py", ["--lr", "1"])
    with pytest.raises(ConfigError, match="a training script"):
        parse(["--machines", "2"])
