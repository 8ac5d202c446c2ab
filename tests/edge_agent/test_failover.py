"""The agent moves to another server replica when one goes away, with nothing lost.

Replicas are stateless servers over one database, so failover is a matter of connections:
one real server behind two loopback proxies gives two addresses of the same system; cutting
one proxy (open connections reset, new ones refused) is a replica dying as the agent sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.servers import ServerRotation, join_servers, parse_servers
from pulsesync.server.app import RunningServer
from pulsesync.v1 import events_pb2
from tests.support.server import pair_device
from tests.support.tcp_proxy import TcpProxy, tcp_proxy

DRAIN_S = 60.0  # generous: this machine is shared and slow


async def stored(server: RunningServer, device_id: str) -> list[events_pb2.Event]:
    rows = await server.app.db.reader.execute_fetchall(
        "SELECT e.body FROM events e JOIN devices d USING (device_pk)"
        " WHERE d.device_id = ? ORDER BY e.seq",
        (device_id,),
    )
    return [events_pb2.Event.FromString(body) for (body,) in rows]


async def _upload_through_failures(
    server: RunningServer, tmp_path: Path, target: Callable[[TcpProxy, TcpProxy], str]
) -> tuple[int, int]:
    """Record and drain three rounds of events: both replicas up, then each one down in turn.
    Returns the last seq recorded and how often the uplink moved to another address."""
    phone = await pair_device(server, "ada")
    async with tcp_proxy(server.address) as a, tcp_proxy(server.address) as b:
        creds = Credentials(target(a, b), phone.device_id, phone.token, phone.kind)
        async with Agent(tmp_path / "outbox.db", creds, consent=StaticConsent()) as agent:
            for down in (None, a, b):
                if down is not None:
                    (b if down is a else a).unblock()
                    down.block()
                for i in range(200):
                    agent.tracker.tap("study", "deck", f"card_{i}")
                assert await agent.drain(timeout_s=DRAIN_S)
            last = agent.outbox.last_seq
            assert agent.uplink is not None
            stats, moves = agent.uplink.stats(), agent.uplink.servers.moves
    assert stats.acked_through == last
    events = await stored(server, phone.device_id)
    # Every event once, in order: acks came only after commit, and resends were deduplicated.
    assert [e.seq for e in events] == list(range(1, last + 1))
    assert len({e.event_id for e in events}) == last
    return last, moves


async def test_the_agent_moves_between_listed_replicas_as_each_dies(
    server: RunningServer, tmp_path: Path
) -> None:
    last, moves = await _upload_through_failures(
        server, tmp_path, lambda a, b: f"{a.address},{b.address}"
    )
    assert last == 600
    assert moves >= 1  # whichever it started on went down in one of the rounds


async def test_a_grpc_list_target_fails_over_inside_grpc(
    server: RunningServer, tmp_path: Path
) -> None:
    """`ipv4:a,b` (as a DNS name with several addresses): round_robin skips the dead one."""
    last, _ = await _upload_through_failures(
        server, tmp_path, lambda a, b: f"ipv4:{a.address},{b.address}"
    )
    assert last == 600


def test_server_lists_parse_and_round_trip() -> None:
    assert parse_servers("a:1, b:2,,a:1") == ("a:1", "b:2")
    assert parse_servers(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    assert parse_servers("ipv4:10.0.0.1:1,10.0.0.2:1") == ("ipv4:10.0.0.1:1,10.0.0.2:1",)
    assert parse_servers("dns:///pulsesync.example:443") == ("dns:///pulsesync.example:443",)
    assert parse_servers(join_servers(("a:1", "b:2"))) == ("a:1", "b:2")
    with pytest.raises(ValueError, match="only server"):
        join_servers(("a:1", "ipv4:10.0.0.1:1,10.0.0.2:1"))


def test_rotation_goes_round_and_stays_on_a_single_address() -> None:
    r = ServerRotation(("a", "b", "c"), start=1)
    assert [r.current, r.advance(), r.advance(), r.advance()] == ["b", "c", "a", "b"]
    assert r.moves == 3
    one = ServerRotation(("a",))
    assert (one.current, one.advance(), one.moves) == ("a", "a", 0)
    with pytest.raises(ValueError, match="no server"):
        ServerRotation(())


def test_the_cli_takes_repeated_and_comma_separated_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pulsesync.edge_agent.cli import _servers, build_parser

    args = build_parser().parse_args(
        ["pair", "--server", "a:1,b:2", "--server", "c:3", "--code", "X", "--kind", "phone"]
    )
    assert _servers(args.server) == ("a:1", "b:2", "c:3")
    monkeypatch.setenv("PULSESYNC_AGENT_SERVER", "d:4, e:5")
    assert _servers(None) == ("d:4", "e:5")
    run = build_parser().parse_args(["run", "--source", "simulated-phone"])
    assert run.server is None  # keeps the addresses saved at pairing
