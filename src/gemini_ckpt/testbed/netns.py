"""A shaped network for the test bed: each simulated machine in its own Linux network namespace.

Layout of one job (X is the job's subnet octet, also its name tag; N machines):

    gckX-sw   switch namespace: bridge `br0`, one port per machine and one uplink port
    gckX-m<i> machine i: `lo` and `veth0` at 10.X.0.<i+1>/24, cabled to port `m<i>` of the bridge
    gckX-up   the host's end of the uplink, 10.X.0.254/24: the test bed (and its etcd) on the host
              reach every machine through it without entering a namespace

Each machine's cable is capped with an htb qdisc on egress at both ends (`veth0` in the machine,
`m<i>` in the switch), so collectives and replication traffic share one link rate per direction, as
on a real NIC. The uplink is not shaped: it carries only coordination traffic.

Everything is named with the `gck` prefix, so `remove_stale_networks()` can remove what a crashed
test bed left behind (processes still inside those namespaces are killed first). Deleting a
namespace deletes the veth pairs that end in it, the host's uplink included.

Needs root and iproute2 (`ip`, `tc`); `check_host()` says what is missing. A cap is a rate, not
delay or loss: this kernel has no netem.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gemini_ckpt.config import parse_rate
from gemini_ckpt.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "gck"
"""Start of every namespace and host interface name the shaped test bed creates."""

MACHINE_IFACE = "veth0"
"""Name of each machine's link inside its namespace (the same in every one)."""

UPLINK_HOST = 254
"""Last octet of the host's uplink address; machines use 1..253."""

_SUBNETS = range(64, 255)
_LOCK_FILE = Path("/run/gemini-ckpt-netns.lock")
_COMMAND_TIMEOUT_S = 30.0


def check_host() -> None:
    """Make sure namespaces can be built here.

    Raises:
        ConfigError: not running as root, or `ip` / `tc` is not on PATH.
    """
    if os.geteuid() != 0:
        raise ConfigError("--netns needs root: network namespaces and tc require CAP_NET_ADMIN")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"--netns needs iproute2; not found on PATH: {', '.join(missing)}")


def run_ip(*args: str, namespace: str = "") -> str:
    """Run an iproute2 command (`ip ...` or `tc ...`), inside `namespace` if given; its stdout.

    Raises:
        ConfigError: the command failed or hung (the message carries the command and its
            stderr).
    """
    command = [*(["ip", "netns", "exec", namespace] if namespace else []), *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"{' '.join(command)} did not finish in {_COMMAND_TIMEOUT_S} s") from e
    if result.returncode != 0:
        raise ConfigError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def our_namespaces() -> list[str]:
    """Every namespace with the test bed's prefix, from any job, running or crashed."""
    names = [line.split()[0] for line in run_ip("ip", "netns", "list").splitlines() if line]
    return [n for n in names if re.match(rf"^{PREFIX}\d+-", n)]


def remove_namespace(name: str) -> None:
    """Kill what still runs inside namespace `name`, then delete it (a no-op if it is gone)."""
    with contextlib.suppress(ConfigError):
        for pid in run_ip("ip", "netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(ConfigError):
        run_ip("ip", "netns", "del", name)


def remove_stale_networks() -> list[str]:
    """Remove every shaped test bed network on this host (`gemini-ckpt local --cleanup`).

    Also removes those of test beds still running, whose machines then lose their network.

    Raises:
        ConfigError: not root, or iproute2 is missing.
    """
    check_host()
    removed = our_namespaces()
    links = re.findall(rf"^\d+: ({PREFIX}\d+)-up[@:]", run_ip("ip", "-o", "link"), re.MULTILINE)
    for tag in {name.split("-")[0] for name in removed} | set(links):
        remove_uplink(tag)
    for name in removed:
        remove_namespace(name)
    return removed


def remove_uplink(tag: str) -> None:
    """Delete the host's uplink of the network named `tag` (a no-op if it is gone).

    Deleting the switch namespace would take it too, but the kernel does that asynchronously,
    after `ip netns del` returns; a new test bed must not find the old address still in use.
    """
    with contextlib.suppress(ConfigError):
        run_ip("ip", "link", "del", "dev", f"{tag}-up")


def check_testbed_options(
    netns: bool, machines: int, link_bandwidth: str, standby: int, etcd: str
) -> None:
    """Whether the test bed options that concern the shaped network go together.

    Raises:
        ConfigError: a `--link-bandwidth` that is not a rate, or `--netns` with warm standbys
            (they would have to wait inside a machine's namespace before knowing which) or with
            an outside `--etcd` (the machines' namespaces have no route to it), or a bad rate
            or machine count.
    """
    if not netns:
        # Without namespaces nothing is capped: the rate is only interleaving's cost model.
        if link_bandwidth:
            parse_rate(link_bandwidth)
        return
    if standby:
        raise ConfigError(f"--netns does not support warm standbys, got --standby {standby}")
    if etcd:
        raise ConfigError(
            f"--netns runs its own etcd on the job's network; --etcd {etcd} is unreachable there"
        )
    NetworkSpec(machines, link_bandwidth)


@dataclass(frozen=True)
class NetworkSpec:
    """A shaped network's size and link rate (`link_bandwidth` empty: not capped)."""

    machines: int
    link_bandwidth: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.machines < UPLINK_HOST:
            raise ConfigError(
                f"a shaped network holds 1..{UPLINK_HOST - 1} machines, got {self.machines}"
            )
        if self.link_bandwidth:
            parse_rate(self.link_bandwidth)


class ShapedNetwork:
    """One job's namespaces: `start()`, run machines via `exec_prefix`, then `close()`."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.subnet = 0
        self._created: list[str] = []

    @property
    def switch(self) -> str:
        """The switch namespace's name."""
        return f"{PREFIX}{self.subnet}-sw"

    def namespace(self, machine: int) -> str:
        """Machine `machine`'s namespace name."""
        return f"{PREFIX}{self.subnet}-m{machine}"

    def address(self, machine: int) -> str:
        """Machine `machine`'s address, reachable from every machine and from the host."""
        return f"10.{self.subnet}.0.{machine + 1}"

    @property
    def host_address(self) -> str:
        """The host's address on the job's network (where the test bed's etcd listens)."""
        return f"10.{self.subnet}.0.{UPLINK_HOST}"

    def exec_prefix(self, machine: int) -> list[str]:
        """Put this in front of a command line to run it inside machine `machine`'s namespace."""
        return ["ip", "netns", "exec", self.namespace(machine)]

    @staticmethod
    def env() -> dict[str, str]:
        """Environment for processes in a machine namespace: gloo must use the machine's link."""
        return {"GLOO_SOCKET_IFNAME": MACHINE_IFACE}

    def start(self) -> ShapedNetwork:
        """Create the namespaces, links, addresses and caps; on any failure remove them again.

        Raises:
            ConfigError: not root, iproute2 missing, no free 10.X.0.0/24 subnet, or a command
                failed.
        """
        check_host()
        try:
            _LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
            # Two test beds starting at once must not pick the same subnet.
            with _LOCK_FILE.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = _free_subnet()
                self._add_switch()
            for machine in range(self.spec.machines):
                self._add_machine(machine)
        except BaseException:
            self.close()
            raise
        log.info(
            "shaped network 10.%d.0.0/24: %d machines, link %s",
            self.subnet,
            self.spec.machines,
            self.spec.link_bandwidth or "not capped",
        )
        return self

    def _add_switch(self) -> None:
        sw, uplink = self.switch, f"{PREFIX}{self.subnet}-up"
        self._new_namespace(sw)
        run_ip("ip", "link", "add", "br0", "type", "bridge", namespace=sw)
        run_ip("ip", "link", "set", "dev", "br0", "up", namespace=sw)
        run_ip("ip", "link", "add", uplink, "type", "veth", "peer", "name", "uplink", "netns", sw)
        run_ip("ip", "link", "set", "dev", "uplink", "master", "br0", "up", namespace=sw)
        run_ip("ip", "addr", "add", f"{self.host_address}/24", "dev", uplink)
        run_ip("ip", "link", "set", "dev", uplink, "up")

    def _add_machine(self, machine: int) -> None:
        ns, port = self.namespace(machine), f"m{machine}"
        self._new_namespace(ns)
        run_ip("ip", "link", "set", "dev", "lo", "up", namespace=ns)
        run_ip(
            "ip", "link", "add", MACHINE_IFACE, "netns", ns,
            "type", "veth", "peer", "name", port, "netns", self.switch,
        )  # fmt: skip
        run_ip("ip", "link", "set", "dev", port, "master", "br0", "up", namespace=self.switch)
        run_ip(
            "ip", "addr", "add", f"{self.address(machine)}/24", "dev", MACHINE_IFACE, namespace=ns
        )
        run_ip("ip", "link", "set", "dev", MACHINE_IFACE, "up", namespace=ns)
        if self.spec.link_bandwidth:
            rate = f"{parse_rate(self.spec.link_bandwidth)}bit"
            _cap(ns, MACHINE_IFACE, rate)  # machine -> switch
            _cap(self.switch, port, rate)  # switch -> machine

    def _new_namespace(self, name: str) -> None:
        run_ip("ip", "netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Remove the job's namespaces (and with them its links); safe to call twice."""
        if self._created:
            remove_uplink(f"{PREFIX}{self.subnet}")
        for name in reversed(self._created):
            remove_namespace(name)
        self._created.clear()

    def __enter__(self) -> ShapedNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cap(namespace: str, device: str, rate: str) -> None:
    """Shape `device`'s egress to `rate` with one htb class that all traffic falls into."""
    run_ip("tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1",
           namespace=namespace)  # fmt: skip
    run_ip("tc", "class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb",
           "rate", rate, "ceil", rate, namespace=namespace)  # fmt: skip


def _free_subnet() -> int:
    """A 10.X.0.0/24 that no host route or address overlaps and no test bed namespace names.

    Raises:
        ConfigError: every candidate is taken.
    """
    listed = run_ip("ip", "-4", "route", "show", "table", "all") + run_ip("ip", "-4", "addr")
    used = [
        ipaddress.ip_network(text, strict=False)
        for text in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", listed)
    ]
    used = [n for n in used if n.prefixlen > 0]  # 0.0.0.0/0 overlaps everything
    tags = {name.split("-")[0] for name in our_namespaces()}
    for octet in _SUBNETS:
        candidate = ipaddress.ip_network(f"10.{octet}.0.0/24")
        if f"{PREFIX}{octet}" not in tags and not any(candidate.overlaps(n) for n in used):
            return octet
    raise ConfigError(
        f"no free subnet for a shaped network: 10.{_SUBNETS[0]}..10.{_SUBNETS[-1]}.0.0/24 all "
        "overlap a route or a test bed (`gemini-ckpt local --cleanup` removes crashed ones)"
    )
