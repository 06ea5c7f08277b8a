"""A private, bandwidth-limited network for benchmark workers, built from Linux network namespaces.

Each "node" gets its own namespace with one veth interface per NIC; the other ends sit on bridges in a hub
namespace, one bridge (and one subnet, 10.77.<nic>.0/24) per NIC index, like the separate rails of a multi-rail
cluster. ``tc`` token-bucket filters (tbf) shape both directions of every link, so each NIC has an ``rate_mbit``
full-duplex link to its switch, like commodity Ethernet. Processes that share a node reach each other through the
node's loopback (local addresses never leave the namespace), as the GPUs of one machine talk over links much faster
than the network. Nothing touches the host's own network: all addresses live only inside the namespaces created
here, and everything is deleted on exit, also after an error. Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.77"


@dataclass(frozen=True)
class Host:
    """One NIC of a node: what one worker process binds to."""

    namespace: str
    interface: str
    address: str

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run inside this host's namespace, with ``env`` added to the environment it inherits."""
        extra = [f"{key}={value}" for key, value in (env or {}).items()]
        return ["ip", "netns", "exec", self.namespace, *(["env", *extra] if extra else []), *argv]

    def tx_bytes(self) -> int:
        """Bytes this host's interface has sent so far (read from inside its namespace)."""
        table = subprocess.run(self.command(["cat", "/proc/net/dev"]), check=True, capture_output=True,
                               text=True).stdout
        sent = _tx_bytes(table, self.interface)
        if sent is None:
            raise RuntimeError(f"interface {self.interface} not found in namespace {self.namespace}")
        return sent


def available() -> str | None:
    """Why a private network cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"needs iproute2 ({', '.join(missing)} not found)" if missing else None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _shape(namespace: str, interface: str, rate_mbit: float) -> None:
    # A burst of ~1 ms at line rate (at least 32 kB) and a 50 ms queue keep TCP close to the nominal rate.
    burst = max(32_000, int(rate_mbit * 1e6 / 8 / 1000))
    subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface, "root", "tbf", "rate",
         f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"],
        check=True, capture_output=True, text=True,
    )


@contextmanager
def private_network(hosts: int, rate_mbit: float | None) -> Iterator[list[Host]]:
    """Build ``hosts`` one-NIC nodes on one switch, each link limited to ``rate_mbit`` (None: unlimited)."""
    with private_cluster(hosts, 1, rate_mbit) as nodes:
        yield [nics[0] for nics in nodes]


@contextmanager
def private_cluster(nodes: int, nics: int, rate_mbit: float | None) -> Iterator[list[list[Host]]]:
    """Build ``nodes`` namespaces with ``nics`` NICs each; ``result[i][j]`` is NIC j of node i.

    NIC j of every node hangs on switch j (subnet 10.77.j.0/24), so traffic between the NICs j of two nodes stays on
    one shaped rail; traffic inside a node goes through its loopback, unshaped.
    """
    reason = available()
    if reason:
        raise RuntimeError(f"cannot build a private network: {reason}")
    if not 1 <= nodes <= 200:
        raise ValueError(f"nodes={nodes} is invalid: it must lie in [1, 200]")
    if not 1 <= nics <= 16:
        raise ValueError(f"nics={nics} is invalid: it must lie in [1, 16]")
    tag = f"{os.getpid() % 100000}"
    hub = f"easgd-hub-{tag}"
    created = [hub]
    try:
        _ip("netns", "add", hub)
        for j in range(nics):
            _ip("-n", hub, "link", "add", f"br{j}", "type", "bridge")
            _ip("-n", hub, "link", "set", f"br{j}", "up")
        result = []
        for i in range(nodes):
            namespace = f"easgd-w{i}-{tag}"
            _ip("netns", "add", namespace)
            created.append(namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
            # With several NICs, a reply may leave by another NIC than the request came in on (the route follows
            # the destination's subnet): strict reverse-path filtering would drop it.
            for key in ("all", "default"):
                subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"],
                               check=True, capture_output=True, text=True)
            node = []
            for j in range(nics):
                # Names are unique across namespaces: `ip link add ... netns` creates both ends in place.
                inside, outside = (f"eth{i}", f"port{i}") if nics == 1 else (f"n{i}e{j}", f"n{i}p{j}")
                _ip("link", "add", inside, "netns", namespace, "type", "veth", "peer", "name", outside, "netns", hub)
                address = f"{SUBNET}.{j}.{i + 1}"
                _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
                _ip("-n", namespace, "link", "set", inside, "up")
                _ip("-n", hub, "link", "set", outside, "up")
                _ip("-n", hub, "link", "set", outside, "master", f"br{j}")
                if rate_mbit is not None:
                    _shape(namespace, inside, rate_mbit)  # upload
                    _shape(hub, outside, rate_mbit)  # download
                node.append(Host(namespace, inside, address))
            result.append(node)
        yield result
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def _tx_bytes(table: str, interface: str) -> int | None:
    for line in table.splitlines():
        name, _, data = line.partition(":")
        if name.strip() == interface:
            return int(data.split()[8])
    return None


def interface_tx_bytes(interface: str) -> int | None:
    """Bytes sent so far on ``interface`` of the current namespace."""
    with open("/proc/net/dev") as f:
        return _tx_bytes(f.read(), interface)
