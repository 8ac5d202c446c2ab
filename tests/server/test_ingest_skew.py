"""Ingest refusals and quarantines of hostile values: implausible sent_time, seq beyond int64."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pulsesync.server.app import RunningServer
from pulsesync.server.clock import FakeClock
from pulsesync.server.timeline import skew
from pulsesync.v1 import ingest_pb2
from tests.server.timeline.events import batch, heart_rate, upload
from tests.support.postgres import postgres_database, postgres_dsn
from tests.support.server import pair_device, server_database, start_server, stored_rows

__all__ = ["postgres_database", "postgres_dsn", "server_database"]

S = 1_000_000
DAY = 86_400 * S


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_server(
    tmp_path: Path, clock: FakeClock, server_database: str | None
) -> AsyncIterator[RunningServer]:
    # Every test here runs on both backends (server_database).
    async with start_server(tmp_path, clock=clock, database=server_database) as running:
        yield running


@pytest.mark.parametrize("bad_offset_us", [DAY, 10**9 * S, -DAY, -(10**9) * S])
async def test_an_implausible_sent_time_is_refused_and_later_times_stay_right(
    fake_server: RunningServer, clock: FakeClock, bad_offset_us: int
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        (bad,) = await upload(
            ch, dev.metadata, [batch(1, now + bad_offset_us, [heart_rate(1, now - 5 * S)])]
        )
        assert bad.error.reason == "IMPLAUSIBLE_SENT_TIME"
        assert bad.acked_through_seq == 0
        acks = await upload(
            ch,
            dev.metadata,
            [batch(2, now, [heart_rate(1, now - 10 * S)]), batch(3, now, [heart_rate(2, now)])],
        )
    assert [a.error.reason for a in acks] == ["", ""]
    assert [a.clock_offset.ToMicroseconds() for a in acks] == [0, 0]
    rows = await stored_rows(fake_server, "SELECT seq, t_us FROM events ORDER BY seq")
    assert rows == [(1, now - 10 * S), (2, now)]
    assert await stored_rows(fake_server, "SELECT COUNT(*) FROM quarantine") == [(0,)]


def test_one_sample_far_below_the_estimate_does_not_move_it_until_confirmed() -> None:
    est = skew.SkewEstimator()
    assert est.observe(1, 100 * S, 100 * S - 20_000) == 20_000
    # One batch from a device whose clock claims to be an hour ahead: not adopted.
    assert est.observe(1, 101 * S, 101 * S + 3600 * S) == 20_000
    assert est.observe(1, 102 * S, 102 * S - 30_000) == 20_000
    # A clock that really was stepped an hour forward is followed once it is confirmed.
    for i in range(skew.CONFIRM_SAMPLES - 1):
        assert est.observe(1, (110 + i) * S, (110 + i) * S + 3600 * S) == 20_000
    assert est.observe(1, 120 * S, 120 * S + 3600 * S - 5_000) == -3600 * S


async def test_a_seq_beyond_sqlite_integer_is_quarantined_and_the_valid_event_stored(
    fake_server: RunningServer, clock: FakeClock
) -> None:
    dev = await pair_device(fake_server, "ada")
    now = clock.now_us()
    async with grpc.aio.insecure_channel(fake_server.address) as ch:
        (ack,) = await upload(
            ch, dev.metadata, [batch(1, now, [heart_rate(1, now), heart_rate(2**63, now)])]
        )
    assert not ack.error.reason
    assert [(r.seq, r.reason) for r in ack.rejected] == [
        (2**63, ingest_pb2.REJECTION_REASON_INVALID)
    ]
    assert await stored_rows(fake_server, "SELECT seq FROM events") == [(1,)]
    assert await stored_rows(fake_server, "SELECT reason FROM quarantine") == [("SEQ_TOO_LARGE",)]
