"""Private etcd servers: one for a job on this host, a standalone one, or a loopback cluster.

`EtcdServer` starts `members` etcd processes (1 by default; 3 for a fault-tolerant loopback cluster
in tests) on free ports, each with its own data directory, waits until every member serves a
linearizable read through our own client, and stops them with SIGTERM, then SIGKILL. With short
heartbeat and election timeouts a single member is ready in about 0.1 s.

Free ports are found by binding port 0 and closing the socket, so another process can take one
before etcd binds it; a member that exits with "address already in use" makes `start()` pick new
ports and try again (`EtcdServerConfig.port_attempts` times).

Call order: `start()`, then any of `endpoints`/`kill`/`restart`, then `stop()` (also on `close()`
and on leaving a `with` block). A process that is SIGKILLed itself leaves its etcd running.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gemini_ckpt.config import EtcdClientConfig
from gemini_ckpt.coordination.etcd_kv import EtcdKV
from gemini_ckpt.errors import ConfigError, CoordinationError, EtcdServerError

log = logging.getLogger(__name__)

_PORT_TAKEN = "address already in use"


@dataclass(frozen=True)
class EtcdServerConfig:
    """How to run private etcd members.

    `host` is where members listen, `advertise_host` the name clients and peers use to reach them
    (default: `host`; required when `host` is 0.0.0.0). Ports 0 mean "free ports"; fixed ports are
    only possible with one member. `data_dir` None means a temporary directory that `stop()`
    removes; a given directory is kept (a restarted server finds its data again).
    """

    host: str = "127.0.0.1"
    advertise_host: str | None = None
    client_port: int = 0
    peer_port: int = 0
    members: int = 1
    data_dir: Path | None = None
    heartbeat_ms: int = 10
    election_ms: int = 100
    binary: str = "etcd"
    ready_timeout_s: float = 10.0
    stop_timeout_s: float = 5.0
    port_attempts: int = 5

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError(f"an etcd cluster needs at least 1 member, got {self.members}")
        if self.members > 1 and (self.client_port or self.peer_port):
            raise ConfigError("fixed etcd ports are only possible with a single member")
        if not 0 <= self.client_port < 65536 or not 0 <= self.peer_port < 65536:
            raise ConfigError(
                f"etcd ports must be in 0..65535: {self.client_port}, {self.peer_port}"
            )
        if self.host in ("0.0.0.0", "::") and not self.advertise_host:
            raise ConfigError(f"etcd listening on {self.host} needs an address to advertise")
        if self.heartbeat_ms < 1 or self.election_ms < 5 * self.heartbeat_ms:
            raise ConfigError(
                f"etcd election timeout ({self.election_ms} ms) must be at least 5x the "
                f"heartbeat ({self.heartbeat_ms} ms)"
            )
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0 or self.port_attempts < 1:
            raise ConfigError("etcd timeouts and port attempts must be positive")

    @property
    def advertised(self) -> str:
        """The host name put into the URLs that clients and peers use."""
        return self.advertise_host or self.host


@dataclass(frozen=True)
class Member:
    """One etcd member's identity: fixed for its lifetime, so a restart finds its data."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path


def member_command(config: EtcdServerConfig, member: Member, cluster: list[Member]) -> list[str]:
    """The etcd command line of `member` in `cluster` (pure; the binary must be on PATH)."""
    adv, host = config.advertised, config.host
    peers = ",".join(f"{m.name}=http://{adv}:{m.peer_port}" for m in cluster)
    return [
        config.binary,
        f"--name={member.name}",
        f"--data-dir={member.data_dir}",
        f"--listen-client-urls=http://{host}:{member.client_port}",
        f"--advertise-client-urls=http://{adv}:{member.client_port}",
        f"--listen-peer-urls=http://{host}:{member.peer_port}",
        f"--initial-advertise-peer-urls=http://{adv}:{member.peer_port}",
        f"--initial-cluster={peers}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token=gemini-{cluster[0].peer_port}",
        f"--heartbeat-interval={config.heartbeat_ms}",
        f"--election-timeout={config.election_ms}",
        "--logger=zap",
        "--log-level=warn",
    ]


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports that were free on `host` a moment ago (bound to 0, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sockets.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class _PortTakenError(EtcdServerError):
    """A member could not bind its port: another process took it after we chose it."""


class EtcdServer:
    """Private etcd member processes; see the module docstring for the call order."""

    def __init__(self, config: EtcdServerConfig | None = None) -> None:
        self.config = config or EtcdServerConfig()
        self._root: Path | None = None
        self._members: list[Member] = []
        self._procs: list[subprocess.Popen[bytes] | None] = []
        self._logs: list[IO[bytes] | None] = []

    @property
    def endpoints(self) -> tuple[str, ...]:
        """`host:port` of every member's client URL."""
        return tuple(f"{self.config.advertised}:{m.client_port}" for m in self._members)

    @property
    def endpoint(self) -> str:
        """The first member's client endpoint (the only one of a single server)."""
        return self.endpoints[0]

    def start(self) -> EtcdServer:
        """Start every member and wait until each serves reads; returns self.

        Raises:
            EtcdServerError: the etcd binary is missing, a member exited, or the cluster was not
                healthy within `ready_timeout_s`.
        """
        if shutil.which(self.config.binary) is None:
            raise EtcdServerError(
                f"the etcd server binary {self.config.binary!r} is not on PATH; install the "
                "Debian package `etcd-server` (apt-get install etcd-server)"
            )
        self._root = Path(tempfile.mkdtemp(prefix="gemini-etcd-"))
        for attempt in range(1, self.config.port_attempts + 1):
            self._members = self._plan_members()
            try:
                for i in range(len(self._members)):
                    self._launch(i)
                self._wait_healthy(range(len(self._members)))
            except _PortTakenError as e:
                log.info("etcd port taken (attempt %d): %s", attempt, e)
                self._terminate_all()
                if self.config.data_dir is None:  # members that did start recorded the old ports
                    for member in self._members:
                        shutil.rmtree(member.data_dir, ignore_errors=True)
                continue
            except BaseException:
                self.stop()
                raise
            log.info("etcd serving at %s", ",".join(self.endpoints))
            return self
        self.stop()
        raise EtcdServerError(f"no free ports for etcd after {self.config.port_attempts} tries")

    def poll(self) -> str | None:
        """Why a member is no longer running (its exit status and log tail), or None if all are."""
        for i, proc in enumerate(self._procs):
            if proc is not None and proc.poll() is not None:
                return f"etcd member {i} exited with {proc.returncode}: {self._log_tail(i, 500)}"
        return None

    def kill(self, index: int) -> None:
        """SIGKILL member `index` (a machine failing); its data directory stays."""
        proc = self._procs[index]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(self.config.stop_timeout_s)
        self._close_log(index)

    def signal(self, index: int, sig: int) -> None:
        """Send `sig` to member `index` (SIGSTOP/SIGCONT make it unresponsive for a while)."""
        proc = self._procs[index]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def restart(self, index: int) -> None:
        """Start member `index` again with its flags and data, and wait until it serves reads.

        Raises:
            EtcdServerError: it exited or was not healthy within `ready_timeout_s`.
        """
        self.kill(index)
        self._launch(index)
        self._wait_healthy([index])

    def stop(self) -> None:
        """Stop every member and remove temporary data (idempotent).

        Members with data to keep (a single one, or `data_dir` given) get SIGTERM, then SIGKILL
        after `stop_timeout_s`, one after the other; a cluster on temporary data gets SIGKILL.
        """
        self._terminate_all()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def close(self) -> None:
        """Same as `stop()`."""
        self.stop()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------

    def _plan_members(self) -> list[Member]:
        cfg, root = self.config, self._root
        if root is None:
            raise EtcdServerError("etcd server not started")
        if cfg.members == 1 and cfg.client_port and cfg.peer_port:
            ports = [cfg.client_port, cfg.peer_port]
        else:
            ports = free_ports(cfg.host, 2 * cfg.members)
            if cfg.members == 1:
                ports = [cfg.client_port or ports[0], cfg.peer_port or ports[1]]
        data = cfg.data_dir if cfg.data_dir is not None else root
        return [
            Member(f"gemini{i}", ports[2 * i], ports[2 * i + 1], data / f"member{i}.etcd")
            for i in range(cfg.members)
        ]

    def _launch(self, index: int) -> None:
        member, root = self._members[index], self._root
        if root is None:
            raise EtcdServerError("etcd server not started")
        command = member_command(self.config, member, self._members)
        log_file = (root / f"{member.name}.log").open("ab")
        while len(self._procs) <= index:
            self._procs.append(None)
            self._logs.append(None)
        self._logs[index] = log_file
        try:
            # Own session: a Ctrl-C meant for the caller does not reach etcd; stop() does.
            self._procs[index] = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            raise EtcdServerError(f"cannot start {command[0]}: {e}") from e

    def _wait_healthy(self, indexes: range | list[int]) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        for i in indexes:
            endpoint = f"{self.config.advertised}:{self._members[i].client_port}"
            client = EtcdKV(EtcdClientConfig((endpoint,), attempt_timeout_s=0.2))
            with client.start(check=False):
                while True:
                    self._check_alive(i)
                    try:
                        client.get("health", timeout_s=0.2)
                        break
                    except CoordinationError as e:
                        if time.monotonic() >= deadline:
                            raise EtcdServerError(
                                f"etcd member {i} at {endpoint} not healthy within "
                                f"{self.config.ready_timeout_s} s: {e}; log: {self._log_tail(i)}"
                            ) from e
                        time.sleep(0.01)

    def _check_alive(self, index: int) -> None:
        proc = self._procs[index]
        if proc is None or proc.poll() is None:
            return
        tail = self._log_tail(index)
        if _PORT_TAKEN in tail:
            raise _PortTakenError(f"member {index}: {tail}")
        raise EtcdServerError(f"etcd member {index} exited with {proc.returncode}: {tail}")

    def _log_tail(self, index: int, chars: int = 2000) -> str:
        if self._root is None:
            return ""
        path = self._root / f"{self._members[index].name}.log"
        try:
            return path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"

    def _terminate_all(self) -> None:
        # Temporary data of a cluster: nothing to keep, and a leader told to stop waits seconds
        # to hand over to peers that are stopping too. Otherwise one member at a time, politely.
        polite = self.config.members == 1 or self.config.data_dir is not None
        for proc in self._procs:
            if proc is None or proc.poll() is not None:
                continue
            if not polite:
                proc.kill()
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("etcd pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(self.config.stop_timeout_s)
        for i in range(len(self._logs)):
            self._close_log(i)
        self._procs = []
        self._logs = []

    def _close_log(self, index: int) -> None:
        log_file = self._logs[index] if index < len(self._logs) else None
        if log_file is not None:
            log_file.close()
            self._logs[index] = None
