"""A private, bandwidth-limited network for benchmark workers, built from Linux network namespaces.

Each worker gets its own namespace with one veth interface; the other ends sit on a bridge in a hub namespace.
``tc`` token-bucket filters (tbf) shape both directions of every worker's link, so each worker has an
``rate_mbit`` full-duplex link to the switch, like a commodity Ethernet cluster. Nothing touches the host's own
network: all addresses (10.77.0.0/24) live only inside the namespaces created here, and everything is deleted on
exit, also after an error. Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.77.0"


@dataclass(frozen=True)
class Host:
    """One worker's end of the network."""

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
    """Build ``hosts`` namespaces on one switch, each link limited to ``rate_mbit`` (None: unlimited)."""
    reason = available()
    if reason:
        raise RuntimeError(f"cannot build a private network: {reason}")
    if not 1 <= hosts <= 200:
        raise ValueError(f"hosts={hosts} is invalid: it must lie in [1, 200]")
    tag = f"{os.getpid() % 100000}"
    hub = f"easgd-hub-{tag}"
    created = [hub]
    try:
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        result = []
        for i in range(hosts):
            namespace = f"easgd-w{i}-{tag}"
            _ip("netns", "add", namespace)
            created.append(namespace)
            inside, outside = f"eth{i}", f"port{i}"
            _ip("link", "add", inside, "netns", namespace, "type", "veth", "peer", "name", outside, "netns", hub)
            address = f"{SUBNET}.{i + 1}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            for ns, dev in ((namespace, inside), (namespace, "lo"), (hub, outside)):
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", hub, "link", "set", outside, "master", "br0")
            if rate_mbit is not None:
                _shape(namespace, inside, rate_mbit)  # upload
                _shape(hub, outside, rate_mbit)  # download
            result.append(Host(namespace, inside, address))
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
