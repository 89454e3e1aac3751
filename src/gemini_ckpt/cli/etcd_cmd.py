"""`gemini-ckpt etcd`: run a standalone etcd server for a job that spans several hosts.

Prints the endpoint to give every machine's agent (`--etcd HOST:PORT`) on stdout, then serves until
interrupted (Ctrl-C or SIGTERM), when it stops etcd and, unless `--data-dir` was given, removes its
data. Every flag has a `GEMINI_ETCD_*` environment twin. One member only: for a fault-tolerant
cluster, run etcd itself on three hosts and pass all three endpoints to `--etcd`. The server has
no TLS and no authentication: listen on a trusted network only.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gemini_ckpt.config import env_default
from gemini_ckpt.coordination.etcd_server import EtcdServer, EtcdServerConfig
from gemini_ckpt.errors import ConfigError


def _env(flag: str) -> str:
    return "GEMINI_ETCD_" + flag.lstrip("-").removeprefix("etcd-").replace("-", "_").upper()


def _flag(parser: Any, flag: str, default: str | None, help_text: str, **kwargs: Any) -> None:
    value = env_default(_env(flag), default)
    parser.add_argument(flag, default=value, help=f"{help_text} (env {_env(flag)})", **kwargs)


def add_parser(subparsers: Any) -> None:
    """Register `etcd`."""
    p = subparsers.add_parser(
        "etcd", help="run a standalone etcd server for multi-host jobs", description=__doc__
    )
    _flag(p, "--host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    _flag(
        p,
        "--advertise-host",
        None,
        "address other hosts use to reach this one (default: --host, or this host's name "
        "when listening on 0.0.0.0)",
    )
    _flag(p, "--client-port", "2379", "client port (0: a free port)", type=int)
    _flag(p, "--peer-port", "2380", "peer port (0: a free port)", type=int)
    _flag(
        p,
        "--data-dir",
        None,
        "where etcd keeps its data (default: a temporary directory removed at exit)",
        type=Path,
    )
    _flag(p, "--heartbeat-ms", "100", "raft heartbeat interval in ms", type=int)
    _flag(p, "--election-ms", "1000", "raft election timeout in ms", type=int)
    _flag(p, "--etcd-binary", "etcd", "the etcd server program")
    p.set_defaults(run=run)


def server_config(args: argparse.Namespace) -> EtcdServerConfig:
    """The server configuration the flags describe.

    Raises:
        ConfigError: a flag has a value that cannot work.
    """
    advertise = args.advertise_host
    if not advertise and args.host in ("0.0.0.0", "::"):
        advertise = socket.getfqdn()
    try:
        return EtcdServerConfig(
            host=args.host,
            advertise_host=advertise,
            client_port=int(args.client_port),
            peer_port=int(args.peer_port),
            data_dir=Path(args.data_dir) if args.data_dir else None,
            heartbeat_ms=int(args.heartbeat_ms),
            election_ms=int(args.election_ms),
            binary=args.etcd_binary,
        )
    except ValueError as e:
        raise ConfigError(f"invalid etcd flag: {e}") from e


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    """Start etcd, print its endpoint, and serve until interrupted; 1 if etcd itself exits."""
    server = EtcdServer(server_config(args))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        print(server.endpoint, flush=True)
        print(
            f"gemini-ckpt: etcd serving at {server.endpoint}; give every agent "
            f"--etcd {server.endpoint}. Ctrl-C stops it.",
            file=sys.stderr,
        )
        while (reason := server.poll()) is None:
            time.sleep(0.2)
        print(f"gemini-ckpt: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gemini-ckpt: stopping etcd", file=sys.stderr)
        return 0
    finally:
        server.stop()
