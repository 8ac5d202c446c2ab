from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from pathlib import Path

import grpc
import pytest

from pulsesync.edge_agent.client import PairingRequired
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.uplink import Backoff, Uplink
from pulsesync.v1 import ingest_pb2
from tests.edge_agent.fake_ingest import FakeIngest, credentials_for, fake_ingest_server
from tests.edge_agent.helpers import taps, until_empty


class _Sleeps:
    """An injected sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


class _Ceiling(random.Random):
    """A random source that always picks the top of the range (to see the bounds)."""

    def uniform(self, a: float, b: float) -> float:
        return b


@contextlib.asynccontextmanager
async def running(uplink: Uplink):
    task = asyncio.create_task(uplink.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def outbox(tmp_path: Path):
    async with await Outbox.open(tmp_path / "outbox.db") as ob:
        yield ob


async def test_streams_everything_and_deletes_only_acked(outbox: Outbox) -> None:
    fake = FakeIngest()
    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(1234))
        uplink = Uplink(outbox, credentials_for(address), settings=AgentSettings(batch_size=100))
        async with running(uplink):
            await until_empty(outbox)
    assert sorted(fake.stored) == list(range(1, 1235))
    assert max(fake.batch_sizes) == 100
    assert outbox.acked_through == 1234
    assert uplink.stats().events_sent == 1234


async def test_new_event_is_sent_promptly_without_polling(outbox: Outbox) -> None:
    fake = FakeIngest()
    async with fake_ingest_server(fake) as address:
        uplink = Uplink(outbox, credentials_for(address))
        async with running(uplink):
            await outbox.append(taps(1))
            await fake.wait_stored(1)  # first stream is up and idle now
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await outbox.append(taps(1))
            await fake.wait_stored(2, timeout_s=1.0)
            assert loop.time() - t0 < 1.0
            await until_empty(outbox)


async def test_resends_unacked_after_dropped_stream(outbox: Outbox) -> None:
    fake = FakeIngest()
    fake.drop_after = [2, 0, 3]  # three streams die, with stored-but-unacked batches
    sleeps = _Sleeps()
    async with fake_ingest_server(fake) as address:
        appended = await outbox.append(taps(2000))
        uplink = Uplink(
            outbox,
            credentials_for(address),
            settings=AgentSettings(batch_size=250),
            sleep=sleeps,
            rng=random.Random(7),
        )
        async with running(uplink):
            await until_empty(outbox)
    assert appended == 2000
    assert sorted(fake.stored) == list(range(1, 2001)), "every event reached the server"
    assert fake.conflicts == []
    assert sum(fake.on_wire.values()) > 2000, "the unacked batches crossed the wire again"
    assert fake.streams == 4
    assert len(sleeps.delays) == 3
    assert uplink.stats().reconnects == 3


async def test_batch_too_large_shrinks_batches(outbox: Outbox) -> None:
    fake = FakeIngest(max_batch=120)
    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(1000))
        uplink = Uplink(outbox, credentials_for(address), settings=AgentSettings(batch_size=500))
        async with running(uplink):
            await until_empty(outbox)
    assert sorted(fake.stored) == list(range(1, 1001))
    assert uplink.batch_size <= 120
    assert fake.batch_sizes[0] == 500
    assert max(fake.batch_sizes[-5:]) <= 120


async def test_ack_after_a_refused_batch_does_not_cover_it(outbox: Outbox) -> None:
    """The server acks a batch's highest seq; when an earlier in-flight batch was refused,
    that ack must not delete the refused batch's events."""
    fake = FakeIngest(ack_delay_s=0.01)
    fake.refuse_batch_ids = {1}
    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(1000))
        uplink = Uplink(
            outbox, credentials_for(address), settings=AgentSettings(batch_size=250, window=4)
        )
        async with running(uplink):
            await until_empty(outbox)
    assert sorted(fake.stored) == list(range(1, 1001))


async def test_unauthenticated_stops_with_pair_again(outbox: Outbox) -> None:
    fake = FakeIngest()
    sleeps = _Sleeps()
    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(3))
        uplink = Uplink(outbox, credentials_for(address, token="revoked"), sleep=sleeps)
        with pytest.raises(PairingRequired, match="Pair it again"):
            async with asyncio.timeout(10):
                await uplink.run()
    # The refusal ends the run at once: the uplink waits for the server to accept the stream
    # before writing, so it sees UNAUTHENTICATED, never a racing write's INTERNAL.
    assert sleeps.delays == []
    assert await outbox.count() == 3, "nothing deleted"


def test_backoff_bounds_and_reset() -> None:
    top = Backoff(0.5, 30.0, rng=_Ceiling())
    assert [top.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    top.reset()
    assert top.next_delay() == 0.5
    jittered = Backoff(0.5, 30.0, rng=random.Random(3))
    delays = [jittered.next_delay() for _ in range(200)]
    assert all(0 <= d <= 30 for d in delays)
    assert len(set(delays)) == 200, "full jitter: every delay differs"
    assert min(delays[10:]) < 5 < max(delays[10:]), "spread over the whole window"


async def test_reconnects_with_backoff_while_server_is_down(outbox: Outbox) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    fake = FakeIngest()
    sleeps = _Sleeps()
    async with fake_ingest_server(fake) as address:
        attempts = iter([dead, dead, dead, dead])

        def connect() -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(next(attempts, address))

        await outbox.append(taps(10))
        uplink = Uplink(
            outbox, credentials_for(address), connect=connect, sleep=sleeps, rng=_Ceiling()
        )
        async with running(uplink):
            await until_empty(outbox)
    assert sleeps.delays == [0.5, 1, 2, 4]
    assert "UNAVAILABLE" in (uplink.stats().last_error or "")
    assert sorted(fake.stored) == list(range(1, 11))


async def test_healthy_period_resets_backoff(outbox: Outbox) -> None:
    fake = FakeIngest()
    fake.drop_after = [0, 0, 0]
    sleeps = _Sleeps()
    now = [0.0]

    def monotonic() -> float:
        now[0] += 4.0  # each stream looks 4+ s long: two reads per stream span 10 s
        return now[0]

    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(5))
        uplink = Uplink(
            outbox,
            credentials_for(address),
            settings=AgentSettings(healthy_period_s=1.0),
            sleep=sleeps,
            rng=_Ceiling(),
            monotonic=monotonic,
        )
        async with running(uplink):
            await until_empty(outbox)
    assert sleeps.delays == [0.5, 0.5, 0.5]


async def test_rejected_events_are_logged(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    class Rejecting(FakeIngest):
        async def Upload(self, request_iterator, context):
            async for response in super().Upload(request_iterator, context):
                if response.acked_through_seq:
                    r = response.rejected.add()
                    r.seq, r.event_id = 2, "x"
                    r.reason = ingest_pb2.REJECTION_REASON_INVALID
                    r.detail = "device_time is 3650 days in the future"
                yield response

    fake = Rejecting()
    async with fake_ingest_server(fake) as address:
        await outbox.append(taps(3))
        uplink = Uplink(outbox, credentials_for(address))
        with caplog.at_level(logging.WARNING):
            async with running(uplink):
                await until_empty(outbox)
    assert "3650 days in the future" in caplog.text
    assert uplink.stats().rejected == 1
