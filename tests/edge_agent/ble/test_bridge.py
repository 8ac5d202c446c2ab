"""The real bridge (bleak + bleak-retry-connector) against emulated sensors over bumble."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import pytest
from bleak.exc import BleakError
from bleak_retry_connector import BleakOutOfConnectionSlotsError

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.ble.backends import BleBackends
from pulsesync.edge_agent.ble.bridge import (
    DEFAULT_BACKOFF,
    Bridge,
    BridgeConfig,
    ErrorClass,
    LinkLost,
    SensorLink,
    SensorNotFound,
    classify,
)
from pulsesync.edge_agent.ble.parsers import HeartRateMeasurement, Location, RscMeasurement
from pulsesync.edge_agent.ble.scanner import scan
from pulsesync.v1 import events_pb2
from tests.support.bumble_backend import (
    ListSink,
    emulated_world,
    failing_client_backend,
    wait_until,
)

FAST = {
    ErrorClass.LINK_LOST: retry.RetryPolicy(0.05, 0.4),
    ErrorClass.NOT_FOUND: retry.RetryPolicy(0.1, 0.4),
    ErrorClass.OUT_OF_SLOTS: retry.RetryPolicy(0.1, 0.4),
    ErrorClass.CONNECT_FAILED: retry.RetryPolicy(0.1, 0.4),
    ErrorClass.SETUP_FAILED: retry.RetryPolicy(0.1, 0.4),
}
# Waiting for the next advertisement plus connecting on the virtual link takes tens of ms when
# the machine is idle, but several seconds were seen on the shared 2-core machine at load 20+.
# The bound only has to tell "reconnected right after its delay" from "waited out a scan
# timeout or a longer backoff" (the NOT_FOUND policy starts at 2 s, caps at 60 s), so it is
# generous rather than a measure of speed.
RECONNECT_SLACK_S = 10.0


def _has_sessions(link: SensorLink, n: int) -> bool:
    return link.stats.sessions == n


def config(**kw) -> BridgeConfig:
    return BridgeConfig(scan_timeout_s=1.0, backoff=FAST, seed=3, **kw)


@contextlib.asynccontextmanager
async def running(bridge: Bridge):
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(10):
            await bridge.wait_connected()
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def hr_tuple(hr: events_pb2.HeartRate) -> tuple[int, list[float]]:
    return hr.bpm, [round(x, 3) for x in hr.rr_intervals_ms]


def hr_from_payload(payload: bytes) -> tuple[int, list[float]]:
    m = HeartRateMeasurement.from_bytes(payload)
    return m.bpm, [round(x, 3) for x in m.rr_intervals_ms]


def rsc_tuple(c: events_pb2.Cadence) -> tuple[int, float]:
    return round(c.cadence_per_min), round(c.speed_m_per_s, 4)


def rsc_from_payload(payload: bytes) -> tuple[int, float]:
    m = RscMeasurement.from_bytes(payload)
    return m.cadence_per_min, round(m.speed_m_per_s, 4)


async def test_scan_lists_supported_sensors_with_name_services_and_rssi():
    async with emulated_world() as w:
        found = await scan(0.3, w.backends)
    by_address = {f.address: f for f in found}
    assert by_address[w.strap.address].name == "PulseStrap"
    assert by_address[w.strap.address].services == ("heart_rate",)
    assert by_address[w.pod.address].services == ("running_speed_cadence",)
    assert all(-100 < f.rssi < 0 for f in found)
    assert w.strap.address in by_address[w.strap.address].line()


async def test_bridge_streams_both_sensors_with_battery_location_and_device_info():
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(
            sink, [w.strap.address, w.pod.address], config=config(), backends=w.backends
        )
        async with running(bridge):
            for _ in range(30):
                await w.strap.tick()
                await w.pod.tick()
            await wait_until(
                lambda: len(sink.of("heart_rate")) == 30 and len(sink.of("cadence")) == 30
            )
            await w.strap.set_battery(87)
            await wait_until(lambda: len(sink.of("battery", w.strap.address)) == 2)
        strap_stats, pod_stats = bridge.stats
    assert [hr_tuple(h) for h in sink.of("heart_rate")] == [
        hr_from_payload(p) for p in w.strap.delivered
    ]
    assert [rsc_tuple(c) for c in sink.of("cadence")] == [
        rsc_from_payload(p) for p in w.pod.delivered
    ]
    hr = sink.of("heart_rate")[0]
    assert hr.sensor_id == w.strap.address
    assert hr.location == events_pb2.BODY_LOCATION_CHEST
    assert hr.contact == events_pb2.SENSOR_CONTACT_DETECTED
    assert 40 <= hr.bpm <= 200
    assert all(300 < rr < 2000 for h in sink.of("heart_rate") for rr in h.rr_intervals_ms)
    assert any(h.HasField("energy_expended_kj") for h in sink.of("heart_rate"))
    assert [b.level_percent for b in sink.of("battery", w.strap.address)] == [100, 87]
    assert strap_stats.location is Location.CHEST
    assert strap_stats.info is not None
    assert strap_stats.info.manufacturer == "PulseSync Labs"
    assert strap_stats.info.model == "HRM-E1"
    assert pod_stats.services == ("running_speed_cadence",)
    # device_time comes from the host clock at notification time, in notification order
    times = [e.device_time.ToMicroseconds() for e in sink.events]
    assert times == sorted(times)


async def test_link_drops_mid_stream_lose_and_duplicate_nothing_and_reconnect_within_backoff():
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(
            sink, [w.strap.address, w.pod.address], config=config(), backends=w.backends
        )
        async with running(bridge):
            for drop in range(4):
                for _ in range(15):
                    await w.strap.tick()
                    await w.pod.tick()
                await wait_until(
                    lambda: (
                        len(sink.of("heart_rate")) == len(w.strap.delivered)
                        and len(sink.of("cadence")) == len(w.pod.delivered)
                    )
                )
                sensor = w.strap if drop % 2 == 0 else w.pod
                link = bridge.links[0 if sensor is w.strap else 1]
                sessions = link.stats.sessions
                assert await sensor.drop_link() == 1
                # measurements produced while the link is down reach nobody
                for _ in range(3):
                    assert await sensor.tick() is None
                await wait_until(partial(_has_sessions, link, sessions + 1))
            for _ in range(10):
                await w.strap.tick()
                await w.pod.tick()
            await wait_until(
                lambda: (
                    len(sink.of("heart_rate")) == len(w.strap.delivered)
                    and len(sink.of("cadence")) == len(w.pod.delivered)
                )
            )
    assert w.strap.produced > len(w.strap.delivered)  # some were produced while down
    assert [hr_tuple(h) for h in sink.of("heart_rate")] == [
        hr_from_payload(p) for p in w.strap.delivered
    ]
    assert [rsc_tuple(c) for c in sink.of("cadence")] == [
        rsc_from_payload(p) for p in w.pod.delivered
    ]
    seqs = [e.seq for e in sink.events]
    assert seqs == list(range(1, len(seqs) + 1))
    reconnects = [r for s in bridge.stats for r in s.reconnects]
    assert len(reconnects) == 4
    for r in reconnects:
        assert r.error is ErrorClass.LINK_LOST
        assert 0.0 <= r.delay_s <= FAST[ErrorClass.LINK_LOST].ceiling(r.attempt)
        assert r.up_at is not None
        assert r.delay_s <= r.up_at - r.down_at <= r.delay_s + RECONNECT_SLACK_S


async def test_out_of_range_backs_off_as_not_found_and_recovers_when_back():
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(
            sink,
            [w.strap.address],
            config=BridgeConfig(scan_timeout_s=0.2, backoff=FAST, seed=1),
            backends=w.backends,
        )
        async with running(bridge):
            link = bridge.links[0]
            await w.strap.leave()
            await wait_until(
                lambda: sum(r.error is ErrorClass.NOT_FOUND for r in link.stats.reconnects) >= 2
            )
            await w.strap.come_back()
            await wait_until(lambda: link.stats.sessions == 2)
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 1)
        errors = [r.error for r in link.stats.reconnects]
        assert errors[0] is ErrorClass.LINK_LOST
        assert ErrorClass.NOT_FOUND in errors[1:]
        # attempts escalate while the sensor stays away
        not_found = [r for r in link.stats.reconnects if r.error is ErrorClass.NOT_FOUND]
        assert [r.attempt for r in not_found] == list(range(1, len(not_found) + 1))


async def test_malformed_notifications_are_counted_and_the_link_keeps_streaming(caplog):
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(sink, [w.strap.address], config=config(), backends=w.backends)
        async with running(bridge):
            await w.strap.tick()
            for garbage in (b"", b"\x01\x3c", b"\x10\x3c\x11", b"\x00\x3c\x00\x00"):
                assert await w.strap.send_raw(garbage)
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 2)
            stats = bridge.stats[0]
            assert stats.parse_errors == 4
            assert stats.sessions == 1
            assert stats.reconnects == []
    assert "Heart Rate Measurement" in caplog.text
    assert [hr_tuple(h) for h in sink.of("heart_rate")] == [
        hr_from_payload(p) for p in w.strap.delivered
    ]


async def test_connect_failures_are_retried_with_their_error_class():
    async with emulated_world() as w:
        # With 2 attempts per establish_connection call, 2 (non-transient) failures make
        # bleak-retry-connector give up once (CONNECT_FAILED); the bridge's retry succeeds.
        client = failing_client_backend(w.air, [BleakError("connection rejected by peer")] * 2)
        backends = BleBackends(client=client, scanner=w.backends.scanner)
        sink = ListSink()
        bridge = Bridge(
            sink, [w.strap.address], config=config(connect_attempts=2), backends=backends
        )
        async with running(bridge):
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 1)
        [r] = bridge.stats[0].reconnects
        assert r.error is ErrorClass.CONNECT_FAILED
        assert r.up_at is not None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (LinkLost("x"), ErrorClass.LINK_LOST),
        (SensorNotFound("x"), ErrorClass.NOT_FOUND),
        (BleakOutOfConnectionSlotsError("x"), ErrorClass.OUT_OF_SLOTS),
        (TimeoutError(), ErrorClass.CONNECT_FAILED),
        (BleakError("service discovery failed"), ErrorClass.SETUP_FAILED),
    ],
)
def test_classify(exc, expected):
    assert classify(exc) is expected


def test_the_bridge_waits_by_the_agents_one_retry_policy():
    # every error class has a policy from edge_agent.retry (full jitter, base and cap)
    assert set(DEFAULT_BACKOFF) == set(ErrorClass)
    assert all(isinstance(p, retry.RetryPolicy) for p in DEFAULT_BACKOFF.values())
    assert DEFAULT_BACKOFF[ErrorClass.LINK_LOST] is retry.BLE_LINK_LOST
    assert DEFAULT_BACKOFF[ErrorClass.LINK_LOST].ceiling(0) == 0.25
    assert DEFAULT_BACKOFF[ErrorClass.LINK_LOST].ceiling(10_000) == 10.0


def test_bridge_without_sensors_says_what_to_do():
    with pytest.raises(ValueError, match="sensors add"):
        Bridge(ListSink(), [])


async def test_a_sensor_back_in_range_is_connected_at_its_next_advertisement_not_the_next_poll():
    # A long NOT_FOUND delay: a bridge that slept it out before looking again would take tens
    # of seconds; one listening to advertisements reconnects as soon as the sensor advertises.
    slow = dict(FAST)
    slow[ErrorClass.NOT_FOUND] = retry.RetryPolicy(120.0, 120.0)
    async with emulated_world() as w:
        sink = ListSink()
        bridge = Bridge(
            sink,
            [w.strap.address],
            config=BridgeConfig(scan_timeout_s=0.2, backoff=slow, seed=1),
            backends=w.backends,
        )
        async with running(bridge):
            link = bridge.links[0]
            await w.strap.leave()
            await wait_until(
                lambda: any(r.error is ErrorClass.NOT_FOUND for r in link.stats.reconnects),
                within_s=20,
            )
            await w.strap.come_back()
            await wait_until(lambda: link.stats.sessions == 2, within_s=20)
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 1)
        last = link.stats.reconnects[-1]
        assert last.error is ErrorClass.NOT_FOUND
        assert last.delay_s > 20.0  # the seeded draw; far longer than the test waited
        assert last.up_at is not None
        assert last.up_at - last.down_at < last.delay_s


async def test_the_shared_scan_recovers_when_it_fails_to_start_or_goes_deaf():
    # The first start fails (a stack still coming up); the next scanner hears nothing (a
    # daemon restarted under it). The bridge must restart the scan and connect anyway.
    async with emulated_world() as w:
        starts: list[str] = []

        class FlakyScanner(w.backends.scanner):  # type: ignore[name-defined,misc]
            async def start(self) -> None:
                starts.append("start")
                if len(starts) == 1:
                    raise BleakError("org.bluez.Error.InProgress: Operation already in progress")
                await super().start()

            def _on_advertisement(self, adv) -> None:  # type: ignore[no-untyped-def]
                if len(starts) == 2:
                    return  # deaf
                super()._on_advertisement(adv)

        sink = ListSink()
        bridge = Bridge(
            sink,
            [w.strap.address],
            config=BridgeConfig(scan_timeout_s=0.3, backoff=FAST, seed=2),
            backends=BleBackends(client=w.backends.client, scanner=FlakyScanner),
        )
        async with running(bridge):
            await w.strap.tick()
            await wait_until(lambda: len(sink.of("heart_rate")) == 1)
        assert len(starts) >= 3
        errors = [r.error for r in bridge.links[0].stats.reconnects]
        assert errors[0] is ErrorClass.SETUP_FAILED  # the scan that failed to start
        assert ErrorClass.NOT_FOUND in errors  # the deaf one
