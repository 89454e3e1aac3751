"""`gemini-ckpt launch`: run this machine's agent, which starts and restarts the training script.

Takes torchrun's options, so `torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 ... train.py`
becomes `gemini-ckpt launch --nnodes 2 --node-rank 0 --nproc-per-node 4 ... train.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType

from gemini_ckpt import config as cfg
from gemini_ckpt.agent.agent import MachineAgent
from gemini_ckpt.agent.standby import await_assignment
from gemini_ckpt.cli.interleave_opts import add_interleave_options, interleave_settings
from gemini_ckpt.cli.workload_opts import add_workload_option, resolve_workload
from gemini_ckpt.coordination.control import ControlPlane
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.coordination.etcd_server import EtcdServer, EtcdServerConfig
from gemini_ckpt.coordination.job import JobCoordinator
from gemini_ckpt.errors import ConfigError
from gemini_ckpt.faults import parse_fault, resolve_faults
from gemini_ckpt.observability import events
from gemini_ckpt.observability.events import EventLog
from gemini_ckpt.store.files import parse_location

_env = cfg.env_or
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `launch` and `local` (each with a GEMINI_* environment twin)."""
    parser.add_argument(
        "--memory-limit",
        default=_env("MEMORY_LIMIT", ""),
        help="checkpoint memory per machine, e.g. 8GiB (default: half of /dev/shm)",
    )
    parser.add_argument(
        "--snapshot-mode",
        default=_env("SNAPSHOT_MODE", "overlapped"),
        choices=cfg.SNAPSHOT_MODES,
        help="overlapped: copy in the background until the next optimizer step; "
        "sync: copy inside save()",
    )
    parser.add_argument(
        "--max-restarts",
        "--max_restarts",
        type=int,
        default=_env("MAX_RESTARTS", "3"),
        help="how many times the worker group may be restarted (default 3)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        help="inject a fault, e.g. kill-worker@step=12,rank=3 (repeatable)",
    )
    parser.add_argument(
        "--fault-seed",
        type=int,
        default=_env("FAULT_SEED", "0"),
        help="seed for faults with random targets (rank=random)",
    )
    parser.add_argument(
        "--run-dir",
        default=_env("RUN_DIR", ""),
        help="where events, logs and sockets go (default: a new temporary dir)",
    )
    parser.add_argument(
        "--tee",
        action="store_true",
        default=_env("TEE", "") == "1",
        help="also show the workers' output on this console",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=_env("STOP_GRACE", "10"),
        help="seconds a stopping worker gets to commit a save under way",
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=_env("HANG_TIMEOUT", "600"),
        help="restart the workers when no step completes for this many seconds",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=_env("STARTUP_TIMEOUT", "600"),
        help="seconds a generation's first step may take (start-up, imports, restore) "
        "before the workers count as hung",
    )
    parser.add_argument(
        "--member-ttl",
        type=int,
        default=_env("MEMBER_TTL", "5"),
        help="seconds without an agent's heartbeat before its machine is declared failed",
    )
    parser.add_argument(
        "--persist-dir",
        default=_env("PERSIST_DIR", ""),
        help="persistent tier: a directory every machine of the job can reach, or an fsspec URL "
        "(s3://bucket/prefix, gs://..., file:///mnt/ckpt; the URL's fsspec package installed)",
    )
    parser.add_argument(
        "--persist-every",
        type=int,
        default=_env("PERSIST_EVERY", "0"),
        help="persist every N-th step (0: only by --persist-interval)",
    )
    parser.add_argument(
        "--persist-interval",
        type=float,
        default=_env("PERSIST_INTERVAL", "0"),
        help="persist at least every this many seconds (0: only by step)",
    )
    parser.add_argument(
        "--persist-keep",
        type=int,
        default=_env("PERSIST_KEEP", "2"),
        help="complete persisted steps to keep (default 2)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=_env("REPLICAS", "2"),
        help="m: copies of every machine's checkpoint in CPU memory, its own included "
        "(the other m-1 on peers chosen by group placement; 1: no peer copies)",
    )
    add_interleave_options(parser)
    add_workload_option(parser)
    parser.add_argument("script", nargs="?", help="the training script (as for torchrun)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `launch`."""
    p = sub.add_parser(
        "launch",
        help="run this machine's agent and its trainers (torchrun-style)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nnodes", type=int, default=_env("NNODES", "1"))
    p.add_argument("--node-rank", "--node_rank", type=int, default=_env("NODE_RANK", "0"))
    p.add_argument(
        "--nproc-per-node", "--nproc_per_node", type=int, default=_env("NPROC_PER_NODE", "1")
    )
    p.add_argument("--master-addr", "--master_addr", default=_env("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", "--master_port", type=int, default=_env("MASTER_PORT", "29500"))
    p.add_argument(
        "--standalone",
        action="store_true",
        help="single machine on a free local port (like torchrun --standalone)",
    )
    p.add_argument(
        "--run-id",
        "--rdzv-id",
        "--rdzv_id",
        default=_env("RUN_ID", ""),
        help="job id, the same on every machine of the job (default: 'gemini'; with "
        "--standalone a new random id)",
    )
    p.add_argument(
        "--etcd",
        default=_env("ETCD", ""),
        help="coordinate through this etcd cluster, HOST:PORT[,HOST:PORT...] (default: a job store "
        "hosted by node 0's agent)",
    )
    p.add_argument(
        "--local-addr",
        default=_env("LOCAL_ADDR", ""),
        help="the address other machines reach this one at (default: 127.0.0.1 for a loopback "
        "job, else this host's address)",
    )
    p.add_argument(
        "--job-secret-file",
        default=_env("JOB_SECRET_FILE", ""),
        help="file with the job's secret (>= 16 bytes, readable by its owner only) that agents "
        "authenticate each other with (default: $GEMINI_JOB_SECRET, else one shared via etcd)",
    )
    p.add_argument(
        "--replica-port",
        type=int,
        default=_env("REPLICA_PORT", "0"),
        help="TCP port this agent serves replicas on (0: any free port; peers learn it via etcd)",
    )
    p.add_argument(
        "--join-store",
        action="store_true",
        help="connect to the job store even on node 0 (a test bed hosts it)",
    )
    p.add_argument(
        "--standby",
        metavar="NAME",
        default=_env("STANDBY", ""),
        help="start as warm standby NAME: connect to --etcd, wait until an operator assigns a "
        "machine of the job, then run as that machine's agent (--node-rank is ignored)",
    )
    add_common_options(p)
    p.set_defaults(run=run)


def agent_config(args: argparse.Namespace) -> cfg.AgentConfig:
    """Build this machine's agent configuration from the parsed options."""
    if args.standalone:
        args.nnodes, args.node_rank, args.master_addr = 1, 0, "127.0.0.1"
    if not args.run_id:
        args.run_id = f"standalone-{secrets.token_hex(4)}" if args.standalone else "gemini"
    if not _RUN_ID.match(args.run_id):
        raise ConfigError(
            f"--run-id {args.run_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it names files and directories)"
        )
    resolve_workload(args)
    if not Path(args.script).is_file():
        raise ConfigError(f"training script {args.script} does not exist")
    specs = [parse_fault(text) for text in args.fault]
    faults = resolve_faults(specs, args.nnodes, args.nproc_per_node, args.fault_seed, args.replicas)
    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else Path(tempfile.gettempdir()) / f"gemini-{args.run_id}"
    )
    memory = cfg.parse_size(args.memory_limit) if args.memory_limit else cfg.default_memory_limit()
    config = cfg.AgentConfig(
        job_id=args.run_id,
        machine=args.node_rank,
        machines=args.nnodes,
        nproc_per_machine=args.nproc_per_node,
        command=(str(Path(args.script)), *args.script_args),
        store_addr=args.master_addr,
        store_port=args.master_port,
        host_store=args.node_rank == 0 and not args.join_store,
        run_dir=run_dir,
        shm_dir=cfg.shm_root() / f"gemini-{args.run_id}" / f"m{args.node_rank}",
        memory_limit=memory,
        max_restarts=args.max_restarts,
        snapshot_mode=args.snapshot_mode,
        stop_grace_s=args.stop_grace,
        tee=args.tee,
        persist_dir=parse_location(args.persist_dir),
        persist_every_steps=args.persist_every,
        persist_every_s=args.persist_interval,
        persist_keep=args.persist_keep,
        hang_timeout_s=args.hang_timeout,
        startup_timeout_s=args.startup_timeout,
        member_ttl_s=args.member_ttl,
        local_addr=args.local_addr or _local_addr(args),
        replicas=args.replicas,
        replica_port=args.replica_port,
        job_secret_file=Path(args.job_secret_file) if args.job_secret_file else None,
        interleave=interleave_settings(args),
    )
    return dataclasses.replace(
        config, faults=tuple(f for f in faults if f.targets(config.machine, config.ranks))
    )


def _local_addr(args: argparse.Namespace) -> str:
    if args.standalone or args.master_addr in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def connect_store(
    config: cfg.AgentConfig, standalone: bool, etcd: str = ""
) -> tuple[EtcdKV, EtcdServer | None]:
    """Connect to etcd: the given cluster, or the job's own one that node 0 runs.

    Without `--etcd`, node 0's agent starts a one-member etcd at --master-addr:--master-port (a
    free loopback port with --standalone) and the other machines connect to it. That etcd goes
    down with node 0; a job that must survive losing any machine passes a 3-member cluster.

    Raises:
        CoordinationError: etcd cannot be reached (the message names the endpoints).
    """
    if etcd:
        return EtcdKV(cfg.EtcdClientConfig(cfg.parse_endpoints(etcd))).start(), None
    endpoint = f"{config.store_addr}:{config.store_port}"
    server = None
    if config.host_store:
        loopback = standalone or config.store_addr in ("127.0.0.1", "localhost")
        server = EtcdServer(
            EtcdServerConfig(
                host="127.0.0.1" if loopback else "0.0.0.0",
                advertise_host=None if loopback else config.store_addr,
                client_port=0 if standalone else config.store_port,
                heartbeat_ms=50,
                election_ms=500,
            )
        ).start()
        endpoint = server.endpoint
    client = cfg.EtcdClientConfig((endpoint,), connect_timeout_s=min(config.join_timeout_s, 60))
    try:
        return EtcdKV(client).start(), server
    except BaseException:
        if server is not None:
            server.stop()
        raise


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    """Run the agent until the job ends."""
    config = agent_config(args)  # also for a standby: its flags are checked before it waits
    standby: tuple[int, float] | None = None
    if args.standby:
        if not args.etcd or args.standalone:
            raise ConfigError("--standby needs --etcd (a standby learns its machine through etcd)")
        kv = EtcdKV(cfg.EtcdClientConfig(cfg.parse_endpoints(args.etcd))).start()
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            standby = await_assignment(
                ControlPlane(kv, config.job_id, config.machines),
                JobCoordinator(kv, config.job_id, config.machines),
                args.standby,
                config.member_ttl_s,
            )
        except BaseException:
            kv.close()
            raise
        if standby is None:
            kv.close()
            return 0
        args.node_rank = standby[0]
        config = agent_config(args)
        etcd_server = None
    else:
        kv, etcd_server = connect_store(config, args.standalone, args.etcd)
    event_log = EventLog(config.machine_dir / "events.jsonl", machine=config.machine)
    agent = MachineAgent(config, kv, event_log)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        agent.start()
        if standby is not None:
            event_log.emit(events.STANDBY_ASSIGNED, standby=args.standby, waited_s=standby[1])
        print(
            f"gemini-ckpt: machine {config.machine} agent up (pid {os.getpid()}), ranks "
            f"{config.ranks.start}..{config.ranks.stop - 1}, run dir {config.run_dir}",
            file=sys.stderr,
        )
        return agent.run()
    finally:
        agent.close()
        kv.close()
        if etcd_server is not None:
            etcd_server.stop()
