"""The server addresses a device talks to, and moving to another replica when one fails.

PulseSync can run as several stateless server replicas over one database. A device is given
their addresses in one of two ways, which combine:

* several addresses (`--server a:50051 --server b:50051`, or `a:50051,b:50051`): the agent
  uses one at a time and, when a stream or call to it fails, moves to the next one, round
  and round, with the usual backoff (retry.py) between attempts;
* one name that resolves to several addresses (`dns:///pulsesync.example.org:50051`) or
  gRPC's own list target (`ipv4:10.0.0.1:50051,10.0.0.2:50051`): gRPC's round_robin policy
  (client.CHANNEL_OPTIONS) connects to every address and sends each new call to one that
  is up, so a dead replica is skipped inside gRPC itself.

The agent's own rotation is what makes the first form work (gRPC has no list of host names),
and it also covers names whose addresses all fail together (another data centre behind
another name). Each address keeps its own name for TLS, so certificates are checked per
replica. Nothing is lost by moving: events leave the outbox only when a server acknowledges
them after its commit, and every mutating call carries a request_id (calls.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Final

# Targets gRPC parses itself, commas included: never split them.
_LIST_TARGETS: Final = ("ipv4:", "ipv6:", "unix:", "unix-abstract:")


def parse_servers(values: str | Iterable[str]) -> tuple[str, ...]:
    """The addresses in one value or several: each may be a comma-separated list, except a
    gRPC list target (`ipv4:a,b`), which stays whole. Blanks and repeats are dropped."""
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        item = item.strip()
        parts = [item] if item.startswith(_LIST_TARGETS) else item.split(",")
        for part in (p.strip() for p in parts):
            if part and part not in out:
                out.append(part)
    return tuple(out)


def check_address(address: str) -> str:
    """The address as given if it is one gRPC can dial: HOST[:PORT] (an IPv6 host in
    brackets; no port: 443), dns:[//AUTHORITY/]NAME[:PORT], or a target gRPC parses itself
    (ipv4:, ipv6:, unix:, unix-abstract:); otherwise ValueError naming it, so a typo stops the
    command instead of showing later as a server that never answers."""
    if address.startswith(_LIST_TARGETS):
        return address
    name = address
    if name.startswith("dns:"):
        name = name.removeprefix("dns:")
        if name.startswith("//"):  # dns://AUTHORITY/NAME
            name = name[2:].partition("/")[2]
    # HOST or HOST:PORT; a bare host name is gRPC's own form for port 443.
    host, sep, port = name.rpartition(":") if ":" in name else (name, "", "")
    if _host_ok(host) and (not sep or _port_ok(port)):
        return address
    raise ValueError(
        f"server address {address!r} is not HOST:PORT (nor dns:///NAME:PORT, ipv4:, ipv6:, unix:)"
    )


def _host_ok(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host)
    return bool(host) and not any(c.isspace() or c in "/[]@?#:" for c in host)


def _port_ok(port: str) -> bool:
    return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def join_servers(servers: Sequence[str]) -> str:
    """The one-string form kept in credentials.json (what parse_servers reads back)."""
    if len(servers) > 1 and any(s.startswith(_LIST_TARGETS) for s in servers):
        # A gRPC list target cannot share a comma list with others.
        raise ValueError("an ipv4:/ipv6:/unix: target must be the only server address")
    return ",".join(servers)


class ServerRotation:
    """One loop's position in the device's server list; `advance()` after a failure."""

    def __init__(self, servers: Sequence[str], *, start: int | None = None) -> None:
        if not servers:
            raise ValueError("no server address")
        self.servers = tuple(servers)
        # A random first address spreads a fleet of devices over the listed replicas.
        self._i = random.randrange(len(self.servers)) if start is None else start
        self._i %= len(self.servers)
        self.moves = 0

    @property
    def current(self) -> str:
        """The address to use now."""
        return self.servers[self._i]

    def advance(self) -> str:
        """Move to the next address (after the current one failed); the new current one."""
        if len(self.servers) > 1:
            self._i = (self._i + 1) % len(self.servers)
            self.moves += 1
        return self.current
