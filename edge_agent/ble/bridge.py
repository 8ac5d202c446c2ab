"""The wearable bridge: keeps chosen BLE sensors connected and turns notifications into events.

One supervised task per sensor (in an `asyncio.TaskGroup`) and one scan shared by all of them
(`Advertisements`, a `BleakScanner` detection callback running for the bridge's lifetime). A
link waits for its sensor's next advertisement, connects with
`bleak_retry_connector.establish_connection`, discovers services, reads battery / body
location / device information, subscribes to every supported measurement, then waits for the
link to drop. After a failure it waits a delay from the agent's one retry policy
(`edge_agent.retry`, full jitter, base and cap by the class of the error); a sensor that is out
of range is connected as soon as it advertises again, not at the next poll.
Each notification is stamped with the host clock in the bleak callback, turned into events by
the sensor's `Translator` (translate.py, the pure part) and handed to the `EventSink` without
blocking. A malformed payload is counted and logged; it never
ends the connection loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDeviceNotFoundError, BleakError
from bleak_retry_connector import (
    BleakAbortedError,
    BleakConnectionError,
    BleakNotFoundError,
    BleakOutOfConnectionSlotsError,
    establish_connection,
)

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.ble import uuids
from pulsesync.edge_agent.ble.backends import BleBackends
from pulsesync.edge_agent.ble.derived import (
    DEFAULT_WHEEL_CIRCUMFERENCE_M,
)
from pulsesync.edge_agent.ble.parsers import (
    BodySensorLocation,
    DeviceInformation,
    GattParseError,
    Location,
    parse_utf8_string,
)
from pulsesync.edge_agent.ble.sensors import normalize_address
from pulsesync.edge_agent.ble.translate import Translation, Translator
from pulsesync.edge_agent.sink import EventSink

_LOG = logging.getLogger(__name__)


class ErrorClass(enum.Enum):
    """Why a sensor is not connected; each class has its own backoff."""

    LINK_LOST = "link_lost"  # was streaming, link dropped (interference, supervision timeout)
    NOT_FOUND = "not_found"  # not advertising: out of range, asleep or switched off
    OUT_OF_SLOTS = "out_of_slots"  # the adapter has no free connection slot
    CONNECT_FAILED = "connect_failed"  # connection attempts failed or were aborted
    SETUP_FAILED = "setup_failed"  # connected, but discovery/subscription failed


# The agent's retry policy for each class (full jitter: sensors that dropped together, a person
# walking away with both, do not reconnect in lock-step).
DEFAULT_BACKOFF: Final[dict[ErrorClass, retry.RetryPolicy]] = {
    ErrorClass.LINK_LOST: retry.BLE_LINK_LOST,
    ErrorClass.NOT_FOUND: retry.BLE_NOT_FOUND,
    ErrorClass.OUT_OF_SLOTS: retry.BLE_OUT_OF_SLOTS,
    ErrorClass.CONNECT_FAILED: retry.BLE_CONNECT_FAILED,
    ErrorClass.SETUP_FAILED: retry.BLE_SETUP_FAILED,
}

# A session that streamed this long counts as healthy and resets the attempt counter.
HEALTHY_SESSION_S: Final = 10.0
# Parse errors are logged for the first few, then every Nth, so a broken sensor cannot
# flood the log at its notification rate.
PARSE_ERROR_LOG_FIRST: Final = 5
PARSE_ERROR_LOG_EVERY: Final = 100
# Batteries drain over hours; a sensor whose level does not notify is re-read this often.
BATTERY_REREAD_S: Final = 600.0
# Disconnecting a link that is already gone can hang inside the BLE stack; cleanup waits at
# most this long so a cancelled bridge always returns.
DISCONNECT_TIMEOUT_S: Final = 5.0


class SensorNotFound(BleakError):
    """The sensor was not seen advertising during the scan."""


class LinkLost(BleakError):
    """The connection dropped while streaming."""


def classify(exc: BaseException) -> ErrorClass:
    """Pick the backoff class for an error raised while connecting or streaming."""
    if isinstance(exc, LinkLost):
        return ErrorClass.LINK_LOST
    if isinstance(exc, BleakOutOfConnectionSlotsError):
        return ErrorClass.OUT_OF_SLOTS
    if isinstance(exc, SensorNotFound | BleakNotFoundError | BleakDeviceNotFoundError):
        return ErrorClass.NOT_FOUND
    if isinstance(exc, BleakConnectionError | BleakAbortedError | TimeoutError):
        return ErrorClass.CONNECT_FAILED
    return ErrorClass.SETUP_FAILED


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Tunables of the bridge."""

    scan_timeout_s: float = 10.0
    connect_attempts: int = 4  # bleak-retry-connector's own default
    steps_window_s: float = 60.0
    rmssd_window_s: float = 60.0
    wheel_circumference_m: float = DEFAULT_WHEEL_CIRCUMFERENCE_M
    backoff: dict[ErrorClass, retry.RetryPolicy] = field(
        default_factory=lambda: dict(DEFAULT_BACKOFF)
    )
    seed: int | None = None  # jitter seed, for reproducible runs
    battery_reread_s: float = BATTERY_REREAD_S


@dataclass(frozen=True, slots=True)
class Reconnect:
    """One recovery: why, which attempt, the chosen delay, and when the link was back."""

    error: ErrorClass
    attempt: int
    # The delay drawn from the retry policy: slept before the next attempt, or for NOT_FOUND
    # the longest wait for the sensor's next advertisement (it connects as soon as one comes).
    delay_s: float
    down_at: float  # monotonic time the failure was noticed
    up_at: float | None = None  # monotonic time notifications were enabled again


@dataclass(slots=True)
class SensorStats:
    """Counters of one sensor link (read by the CLI, the tests and the benchmark)."""

    address: str
    connected: bool = False
    sessions: int = 0
    notifications: int = 0
    events: int = 0
    parse_errors: int = 0
    # Optional reads at setup (battery, body location, device information) that failed and
    # were skipped, by characteristic name.
    skipped_reads: dict[str, int] = field(default_factory=dict)
    # Values not forwarded because the server would quarantine them, by field name.
    dropped_values: dict[str, int] = field(default_factory=dict)
    reconnects: list[Reconnect] = field(default_factory=list)
    info: DeviceInformation | None = None
    location: Location | None = None
    services: tuple[str, ...] = ()


def _now_us() -> int:
    return time.time_ns() // 1000


class Advertisements:
    """One scan for the whole bridge: hands each link its sensor's next advertisement.

    Bleak-based integrations (Home Assistant's habluetooth) keep one scanner running and
    reconnect when the device is next heard, rather than starting a scan per attempt: the
    radio is not restarted on every retry, several links share it, and a sensor coming back
    into range is connected within one advertising interval.

    The scan heals itself: when a wait ends without any advertisement from any device, the
    scanner is restarted (a Bluetooth daemon that restarted leaves a scanner that hears
    nothing), and a scanner that fails to start is started by the next wait, its error going to
    the link that waited (which retries by the error's class).
    """

    def __init__(self, backends: BleBackends) -> None:
        self._backends = backends
        self._waiters: dict[str, list[asyncio.Future[BLEDevice]]] = {}
        self._scanner: BleakScanner | None = None
        self._lock = asyncio.Lock()  # one start/stop at a time, whichever link asks
        self._heard = 0  # advertisements from any device, ever

    def _seen(self, device: BLEDevice, _adv: AdvertisementData) -> None:
        self._heard += 1
        for waiter in self._waiters.pop(device.address.upper(), ()):
            if not waiter.done():
                waiter.set_result(device)

    async def next(self, address: str, timeout_s: float) -> BLEDevice | None:
        """The device at the next advertisement from `address` (normalised), or None when it
        is not heard within `timeout_s`. Raises what starting the scan raised."""
        await self._start()
        heard = self._heard
        waiter: asyncio.Future[BLEDevice] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(address, []).append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            if self._heard == heard:
                await self._restart()
            return None
        finally:
            pending = self._waiters.get(address)
            if pending is not None and waiter in pending:
                pending.remove(waiter)

    async def _start(self) -> None:
        async with self._lock:
            if self._scanner is not None:
                return
            kwargs: dict[str, Any] = (
                {} if self._backends.scanner is None else {"backend": self._backends.scanner}
            )
            scanner = BleakScanner(self._seen, **kwargs)
            await scanner.start()
            self._scanner = scanner

    async def _restart(self) -> None:
        """Start the scan afresh (it heard nothing at all for a whole wait)."""
        await self._stop()
        try:
            await self._start()
        except Exception as exc:  # the next wait starts it again and reports to its link
            _LOG.debug("restarting the scan failed: %s", exc)

    async def _stop(self) -> None:
        async with self._lock:
            scanner, self._scanner = self._scanner, None
            if scanner is not None:
                # Bounded like a disconnect: stopping a scan on a stack that went away can hang.
                with contextlib.suppress(BleakError, OSError, TimeoutError):
                    async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                        await scanner.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()


class SensorLink:
    """Keeps one sensor connected and streaming, for as long as the task runs."""

    def __init__(
        self,
        address: str,
        sink: EventSink,
        *,
        config: BridgeConfig,
        backends: BleBackends,
        clock_us: Callable[[], int] = _now_us,
        advertisements: Advertisements | None = None,
    ) -> None:
        self.address = address
        self._advertisements = advertisements
        self.stats = SensorStats(address)
        self._sink = sink
        self._config = config
        self._backends = backends
        self._clock_us = clock_us
        self._rng = random.Random(config.seed)
        self._translate = Translator(
            address,
            steps_window_s=config.steps_window_s,
            rmssd_window_s=config.rmssd_window_s,
            wheel_circumference_m=config.wheel_circumference_m,
        )
        self._battery_char: BleakGATTCharacteristic | None = None
        self._session_started: float | None = None
        self.connected = asyncio.Event()

    # --- supervision ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, stream, and reconnect with backoff; runs until cancelled."""
        if self._advertisements is None:  # a link on its own runs its own scan
            async with Advertisements(self._backends) as advertisements:
                self._advertisements = advertisements
                try:
                    await self._run()
                finally:
                    self._advertisements = None
        else:
            await self._run()

    async def _run(self) -> None:
        attempt = 0
        device: BLEDevice | None = None  # heard while waiting out a NOT_FOUND delay
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancel the BLE stack swallowed while the last wait ended normally.
                raise asyncio.CancelledError
            try:
                await self._session(device)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure of one sensor is retried, never fatal
                if task is not None and task.cancelling():
                    # The BLE stack swallowed our CancelledError (e.g. inside disconnect) and
                    # raised something else: the cancel request still stands, honour it.
                    raise asyncio.CancelledError from exc
                down_at = time.monotonic()
                self._mark_down()
                error = classify(exc)
                healthy = (
                    self._session_started is not None
                    and down_at - self._session_started >= HEALTHY_SESSION_S
                )
                if error is ErrorClass.LINK_LOST and healthy:
                    attempt = 0
                delay = self._config.backoff[error].delay(attempt, self._rng)
                self.stats.reconnects.append(Reconnect(error, attempt, delay, down_at))
                _LOG.info(
                    "%s: %s (%s); retrying in %.2f s (attempt %d)",
                    self.address,
                    error.value,
                    exc,
                    delay,
                    attempt + 1,
                )
                attempt += 1
                self._session_started = None
                device = None
                if error is ErrorClass.NOT_FOUND:
                    # Out of range: connect at its next advertisement, at the latest look again
                    # (a fresh wait) after the delay.
                    try:
                        device = await self._next_advertisement(delay)
                    except Exception:
                        # The scan cannot start: the session that follows meets the same
                        # error and is retried by its class.
                        device = None
                else:
                    await asyncio.sleep(delay)

    async def _next_advertisement(self, timeout_s: float) -> BLEDevice | None:
        assert self._advertisements is not None  # set for as long as _run runs
        return await self._advertisements.next(self.address, timeout_s)

    def _mark_down(self) -> None:
        self.connected.clear()
        self.stats.connected = False
        self._translate.reset()

    async def _session(self, device: BLEDevice | None) -> None:
        if device is None:
            # A sensor advertises again once its link is gone; connect to that advertisement
            # (an earlier one may name a connection the sensor no longer has).
            device = await self._next_advertisement(self._config.scan_timeout_s)
        if device is None:
            raise SensorNotFound(
                f"{self.address} was not seen advertising within {self._config.scan_timeout_s} s; "
                "bring it in range and wake it (wear the strap, move the footpod)"
            )
        lost = asyncio.Event()
        client = await establish_connection(
            BleakClient,
            device,
            device.name or self.address,
            disconnected_callback=lambda _c: lost.set(),
            max_attempts=self._config.connect_attempts,
            backend=self._backends.client,
        )
        try:
            await self._setup(client)
            self._session_started = time.monotonic()
            self.stats.sessions += 1
            self.stats.connected = True
            if self.stats.reconnects and self.stats.reconnects[-1].up_at is None:
                last = self.stats.reconnects[-1]
                self.stats.reconnects[-1] = Reconnect(
                    last.error, last.attempt, last.delay_s, last.down_at, self._session_started
                )
            self.connected.set()
            if self._battery_char is None:
                await lost.wait()
            else:
                async with asyncio.TaskGroup() as tg:
                    reread = tg.create_task(self._reread_battery(client))
                    await lost.wait()
                    reread.cancel()
            raise LinkLost(f"{self.address}: link lost")
        finally:
            await self._disconnect(client)

    async def _disconnect(self, client: BleakClient) -> None:
        """Disconnect within `DISCONNECT_TIMEOUT_S`, never losing a pending cancellation.

        The disconnect runs as its own task, shielded, so a CancelledError swallowed by the
        BLE stack cannot eat the cancellation of this task; a cancel arriving meanwhile is
        re-raised once the (bounded) disconnect is done.
        """
        disconnect = asyncio.ensure_future(client.disconnect())
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await asyncio.shield(disconnect)
        except (BleakError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            disconnect.cancel()
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await disconnect
            raise
        finally:
            if not disconnect.done():
                disconnect.cancel()
            elif not disconnect.cancelled():
                disconnect.exception()  # retrieved, so it is not logged as never retrieved

    # --- setup ------------------------------------------------------------------------------

    async def _setup(self, client: BleakClient) -> None:
        services = {s.uuid for s in client.services}
        self.stats.services = tuple(
            sorted(uuids.short_name(u) for u in services if u in uuids.SUPPORTED_SERVICES)
        )
        self.stats.info = await self._read_info(client)
        if client.services.get_characteristic(uuids.BODY_SENSOR_LOCATION) is not None:
            raw = await self._optional_read(client, "body_sensor_location")
            if raw is not None:
                try:
                    self.stats.location = BodySensorLocation.from_bytes(raw).location
                    self._translate.location = self.stats.location
                except GattParseError as exc:
                    self._skip("body_sensor_location", exc)
        battery = client.services.get_characteristic(uuids.BATTERY_LEVEL)
        self._battery_char = None
        if battery is not None:
            if "read" in battery.properties:
                self._read_battery(await self._optional_read(client, "battery_level"))
            if "notify" in battery.properties:
                try:
                    await client.start_notify(battery, self._guard(self._translate.battery))
                except BleakError as exc:
                    self._skip("battery_level", exc)
                    if "read" in battery.properties:
                        self._battery_char = battery
            elif "read" in battery.properties:
                self._battery_char = battery  # no notifications: re-read it periodically
        handlers = {
            uuids.HEART_RATE_MEASUREMENT: self._translate.heart_rate,
            uuids.RSC_MEASUREMENT: self._translate.rsc,
            uuids.CSC_MEASUREMENT: self._translate.csc,
            uuids.PLX_CONTINUOUS_MEASUREMENT: self._translate.plx_continuous,
        }
        subscribed = 0
        for char_uuid, handler in handlers.items():
            char = client.services.get_characteristic(char_uuid)
            if char is not None and {"notify", "indicate"} & set(char.properties):
                await client.start_notify(char, self._guard(handler))
                subscribed += 1
        spot = client.services.get_characteristic(uuids.PLX_SPOT_CHECK_MEASUREMENT)
        plx_continuous = client.services.get_characteristic(uuids.PLX_CONTINUOUS_MEASUREMENT)
        continuous_ok = plx_continuous is not None and {"notify", "indicate"} & set(
            plx_continuous.properties
        )
        if spot is not None and not continuous_ok and {"notify", "indicate"} & set(spot.properties):
            # A spot-check-only oximeter indicates each reading on 0x2A5E.
            await client.start_notify(spot, self._guard(self._translate.plx_spot_check))
            subscribed += 1
        if not subscribed:
            raise BleakError(
                f"{self.address} offers none of the supported measurements "
                f"({', '.join(uuids.SUPPORTED_SERVICES.values())}); remove it with "
                "`pulsesync-agent sensors remove`"
            )

    async def _read_info(self, client: BleakClient) -> DeviceInformation:
        values: dict[str, str | None] = {}
        for name, char_uuid in uuids.DEVICE_INFORMATION_STRINGS.items():
            values[name] = None
            if client.services.get_characteristic(char_uuid) is None:
                continue
            raw = await self._optional_read(client, name, char_uuid)
            if raw is None:
                continue
            try:
                values[name] = parse_utf8_string(char_uuid, raw)
            except GattParseError as exc:
                self._skip(name, exc)
        return DeviceInformation(**values)

    async def _optional_read(
        self, client: BleakClient, name: str, char_uuid: str | None = None
    ) -> bytearray | None:
        """Read a characteristic the sensor can stream without; a failure is skipped and counted.

        (e.g. ATT Insufficient Authentication on a Device Information string.)
        """
        target = (
            char_uuid
            or {
                "body_sensor_location": uuids.BODY_SENSOR_LOCATION,
                "battery_level": uuids.BATTERY_LEVEL,
            }[name]
        )
        try:
            return await client.read_gatt_char(target)
        except (BleakError, OSError, TimeoutError) as exc:
            self._skip(name, exc)
            return None

    def _skip(self, name: str, exc: BaseException) -> None:
        self.stats.skipped_reads[name] = self.stats.skipped_reads.get(name, 0) + 1
        _LOG.warning("%s: optional read of %s skipped (%s)", self.address, name, exc)

    def _read_battery(self, raw: bytearray | None) -> None:
        if raw is None:
            return
        try:
            self._deliver(self._translate.battery(raw, self._clock_us()))
        except GattParseError as exc:  # e.g. a level above 100 %
            self._skip("battery_level", exc)

    async def _reread_battery(self, client: BleakClient) -> None:
        """Re-read a battery level that does not notify, every `BATTERY_REREAD_S`."""
        while True:
            await asyncio.sleep(self._config.battery_reread_s)
            self._read_battery(await self._optional_read(client, "battery_level"))

    # --- notifications ----------------------------------------------------------------------

    def _guard(
        self, translate: Callable[[bytearray, int], Translation]
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        """A notification callback: stamp the host time at arrival, translate, record."""

        def callback(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            self.stats.notifications += 1
            at_us = self._clock_us()
            try:
                out = translate(data, at_us)
            except GattParseError as exc:
                self._parse_error(exc)
                return
            self._deliver(out)

        return callback

    def _parse_error(self, exc: GattParseError) -> None:
        self.stats.parse_errors += 1
        n = self.stats.parse_errors
        if n <= PARSE_ERROR_LOG_FIRST or n % PARSE_ERROR_LOG_EVERY == 0:
            _LOG.warning("%s: %s [%d parse errors so far]", self.address, exc, n)

    def _deliver(self, out: Translation) -> None:
        for name, count in out.dropped.items():
            self._drop(name, count)
        for event in out.events:
            self._sink.record(event)
            self.stats.events += 1

    def _drop(self, name: str, count: int = 1) -> None:
        """Count a value not forwarded because the server would quarantine its event."""
        if count:
            self.stats.dropped_values[name] = self.stats.dropped_values.get(name, 0) + count


class Bridge:
    """Runs one `SensorLink` per chosen sensor address, all in one TaskGroup."""

    def __init__(
        self,
        sink: EventSink,
        addresses: Sequence[str],
        *,
        config: BridgeConfig | None = None,
        backends: BleBackends | None = None,
        clock_us: Callable[[], int] = _now_us,
    ) -> None:
        if not addresses:
            raise ValueError(
                "no sensors chosen: run `pulsesync-agent scan`, then "
                "`pulsesync-agent sensors add ADDRESS`"
            )
        cfg = config or BridgeConfig()
        self._backends = backends or BleBackends()
        self._advertisements = Advertisements(self._backends)
        self.links = [
            SensorLink(
                a,
                sink,
                config=cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + i),
                backends=self._backends,
                clock_us=clock_us,
                advertisements=self._advertisements,
            )
            # One sensor is one link, however the address was spelled.
            for i, a in enumerate(dict.fromkeys(normalize_address(a) for a in addresses))
        ]

    async def run(self) -> None:
        """Supervise every sensor until cancelled."""
        async with self._advertisements, asyncio.TaskGroup() as tg:
            for link in self.links:
                tg.create_task(link.run(), name=f"ble-sensor-{link.address}")

    async def wait_connected(self) -> None:
        """Wait until every sensor is streaming (callers bound it with asyncio.timeout)."""
        for link in self.links:
            await link.connected.wait()

    @property
    def stats(self) -> list[SensorStats]:
        return [link.stats for link in self.links]
