"""The options that fit replication traffic into the training network's idle time."""

from __future__ import annotations

import argparse

from gemini_ckpt import config as cfg
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.interleave.settings import InterleaveSettings

_env = cfg.env_or


def add_interleave_options(parser: argparse.ArgumentParser) -> None:
    """How replication traffic is fitted into the training network's idle time."""
    parser.add_argument(
        "--link-bandwidth",
        metavar="RATE",
        default=_env("LINK_BANDWIDTH", ""),
        help="each machine's network link each way, e.g. 1gbit or 200mbit: the cost model of "
        "--interleave (and, for `local --netns`, the rate every link is capped to)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        default=_env("INTERLEAVE", "") == "1",
        help="send replicas only while training leaves the network idle: the trainers profile "
        "their collectives for --profile-iterations, then chunks follow the schedule "
        "(needs --link-bandwidth)",
    )
    parser.add_argument(
        "--interleave-buffer",
        metavar="SIZE",
        default=_env("INTERLEAVE_BUFFER", "32MiB"),
        help="R: bytes a receiver takes in flight (default 32MiB)",
    )
    parser.add_argument(
        "--interleave-sub-buffers",
        type=int,
        metavar="P",
        default=_env("INTERLEAVE_SUB_BUFFERS", "4"),
        help="p: R is cut into P chunks in flight at once (default 4; 1: no pipelining)",
    )
    parser.add_argument(
        "--interleave-margin",
        type=float,
        metavar="MU",
        default=_env("INTERLEAVE_MARGIN", "0.8"),
        help="mu: the fraction of each idle span that may be filled (default 0.8)",
    )
    parser.add_argument(
        "--link-latency",
        type=float,
        metavar="SECONDS",
        default=_env("LINK_LATENCY", "0.0005"),
        help="alpha: the fixed cost of one chunk's transfer (default 0.0005)",
    )
    parser.add_argument(
        "--profile-iterations",
        type=int,
        metavar="N",
        default=_env("PROFILE_ITERATIONS", "20"),
        help="iterations the trainers profile before replication starts (default 20)",
    )


def interleave_settings(args: argparse.Namespace) -> InterleaveSettings | None:
    """The interleaving the options ask for (None: replicas go as soon as committed).

    Raises:
        ConfigError: --interleave without --link-bandwidth, or a value out of range.
    """
    if not args.interleave:
        return None
    if not args.link_bandwidth:
        raise ConfigError(
            "--interleave needs --link-bandwidth RATE (e.g. 1gbit): the schedule's cost model"
        )
    return InterleaveSettings(
        bandwidth_bytes_per_s=cfg.parse_rate(args.link_bandwidth) / 8,
        latency_s=args.link_latency,
        buffer_bytes=cfg.parse_size(args.interleave_buffer),
        sub_buffers=args.interleave_sub_buffers,
        margin=args.interleave_margin,
        profile_iterations=args.profile_iterations,
    )
