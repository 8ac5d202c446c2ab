"""A bleak backend whose central is a bumble host stack on a virtual link (no radio).

bleak lets `BleakScanner`/`BleakClient` take a custom backend class (as bleak-esphome does);
these classes implement bleak's `BaseBleakScanner`/`BaseBleakClient` over a bumble `Device`
acting as the central of a `VirtualAir`. The bridge code above them is the production code:
it only sees bleak's public API while every read, subscribe and notification is a real
ATT/GATT exchange through bumble's host and controller models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bleak.uuids import normalize_uuid_str
from bumble import core, gatt, hci
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from pulsesync.edge_agent.ble.backends import BleBackends

_LOG = logging.getLogger(__name__)

CENTRAL_ADDRESS: Final = "C0:00:00:00:00:01"  # the bridge's own (virtual) adapter address
# The virtual controller reports no RSSI; this is what a sensor a metre away typically shows.
VIRTUAL_RSSI_DBM: Final = -50
# Real adapters time out a connection to an absent device after a few seconds; the virtual
# link answers in microseconds, so a short bound keeps tests and demos responsive.
CONNECT_TIMEOUT_S: Final = 2.0

_PROPERTY_NAMES: Final = (
    (gatt.Characteristic.Properties.BROADCAST, "broadcast"),
    (gatt.Characteristic.Properties.READ, "read"),
    (gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE, "write-without-response"),
    (gatt.Characteristic.Properties.WRITE, "write"),
    (gatt.Characteristic.Properties.NOTIFY, "notify"),
    (gatt.Characteristic.Properties.INDICATE, "indicate"),
    (gatt.Characteristic.Properties.AUTHENTICATED_SIGNED_WRITES, "authenticated-signed-writes"),
    (gatt.Characteristic.Properties.EXTENDED_PROPERTIES, "extended-properties"),
)


def make_device(link: LocalLink, address: str, name: str) -> Device:
    """A bumble host + controller attached to the virtual link."""
    controller = Controller(name, link=link, public_address=address)
    return Device(
        name=name, address=hci.Address(address), host=Host(controller, AsyncPipeSink(controller))
    )


def bleak_uuid(uuid: core.UUID) -> str:
    """bumble UUID -> bleak's normalised lower-case 128-bit string."""
    return normalize_uuid_str(
        uuid.to_hex_str("-") if len(uuid.uuid_bytes) == 16 else uuid.to_hex_str()
    )


class VirtualAir:
    """The radio environment: a virtual link, and the bridge's central on it."""

    def __init__(self) -> None:
        self.link = LocalLink()  # type: ignore[no-untyped-call]
        self.central = make_device(self.link, CENTRAL_ADDRESS, "pulsesync-bridge")
        self._scan_listeners: dict[object, Callable[[Advertisement], None]] = {}
        self._connect_lock = asyncio.Lock()
        self._powered = False

    async def power_on(self) -> None:
        """Start the central's host stack (idempotent)."""
        if not self._powered:
            await self.central.power_on()
            self._powered = True

    def backends(self) -> BleBackends:
        """bleak backend classes bound to this air, for `BleakScanner(backend=...)` and co."""
        scanner = type("BumbleBleakScanner", (BumbleBleakScanner,), {"air": self})
        client = type("BumbleBleakClient", (BumbleBleakClient,), {"air": self})
        return BleBackends(client=client, scanner=scanner)

    async def add_scan_listener(self, key: object, fn: Callable[[Advertisement], None]) -> None:
        """Share the central's one scan among several bleak scanners."""
        await self.power_on()
        first = not self._scan_listeners
        self._scan_listeners[key] = fn
        if first:
            self.central.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
            await self.central.start_scanning(filter_duplicates=False)

    async def remove_scan_listener(self, key: object) -> None:
        """Stop a scanner; the central stops scanning when the last one goes."""
        if self._scan_listeners.pop(key, None) is not None and not self._scan_listeners:
            self.central.remove_listener(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
            with contextlib.suppress(Exception):
                await self.central.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        for fn in list(self._scan_listeners.values()):
            fn(advertisement)

    @contextlib.asynccontextmanager
    async def connecting(self) -> Any:
        """One pending LE connection at a time, as on a real controller."""
        async with self._connect_lock:
            yield


@dataclass(frozen=True, slots=True)
class VirtualDeviceDetails:
    """`BLEDevice.details` for a device seen on the virtual link (not a BlueZ path dict)."""

    address: str


def _advertisement_data(adv: Advertisement) -> AdvertisementData:
    data = adv.data
    name = data.get(core.AdvertisingData.COMPLETE_LOCAL_NAME) or data.get(
        core.AdvertisingData.SHORTENED_LOCAL_NAME
    )
    uuids: list[str] = []
    for ad_type in (
        core.AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
        core.AdvertisingData.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
        core.AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
        core.AdvertisingData.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
    ):
        uuids.extend(bleak_uuid(u) for u in data.get(ad_type) or ())
    manufacturer: dict[int, bytes] = {}
    if (mfr := data.get(core.AdvertisingData.MANUFACTURER_SPECIFIC_DATA)) is not None:
        company, payload = mfr
        manufacturer[int(company)] = bytes(payload)
    return AdvertisementData(
        local_name=str(name) if name else None,
        manufacturer_data=manufacturer,
        service_data={},
        service_uuids=uuids,
        tx_power=None,
        rssi=adv.rssi if adv.rssi != Advertisement.RSSI_NOT_AVAILABLE else VIRTUAL_RSSI_DBM,
        platform_data=(adv,),
    )


class BumbleBleakScanner(BaseBleakScanner):
    """bleak scanner backend over the virtual air's central."""

    air: ClassVar[VirtualAir]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._key = object()

    async def start(self) -> None:
        """Start receiving advertisements."""
        self.seen_devices = {}
        await self.air.add_scan_listener(self._key, self._on_advertisement)

    async def stop(self) -> None:
        """Stop receiving advertisements."""
        await self.air.remove_scan_listener(self._key)

    def _on_advertisement(self, adv: Advertisement) -> None:
        ad = _advertisement_data(adv)
        if not self.is_allowed_uuid(ad.service_uuids):
            return
        address = adv.address.to_string(False)
        device = self.create_or_update_device(
            address, address, ad.local_name, VirtualDeviceDetails(address), ad
        )
        self.call_detection_callbacks(device, ad)


class BumbleBleakClient(BaseBleakClient):
    """bleak client backend: connects, discovers and talks GATT through the bumble central."""

    air: ClassVar[VirtualAir]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._name = (
            address_or_ble_device.name
            if isinstance(address_or_ble_device, BLEDevice) and address_or_ble_device.name
            else self.address
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Connect over the virtual link and discover all services."""
        if self._connection is not None:
            raise BleakError(f"{self.address}: already connected")
        await self.air.power_on()
        timeout = min(float(kwargs.get("timeout", self._timeout)), CONNECT_TIMEOUT_S)
        async with self.air.connecting():
            try:
                connection = await self.air.central.connect(
                    hci.Address(self.address), timeout=timeout
                )
            except core.TimeoutError as exc:
                raise BleakDeviceNotFoundError(
                    self.address, f"{self.address}: no answer to the connection request"
                ) from exc
            except (core.BaseBumbleError, hci.HCI_Error) as exc:
                raise BleakError(f"{self.address}: connection failed: {exc}") from exc
        self._connection = connection
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        peer = Peer(connection)
        try:
            await peer.discover_all()  # type: ignore[no-untyped-call]
        except Exception as exc:
            await self.disconnect()
            raise BleakError(f"{self.address}: service discovery failed: {exc}") from exc
        except asyncio.CancelledError:
            # A cancelled connect must not leave the link up (the sensor would stop advertising).
            await asyncio.shield(self.disconnect())
            raise
        self._peer = peer
        self.services = self._collection(peer)

    def _collection(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        mtu = self.mtu_size
        for svc in peer.services:
            service = BleakGATTService(svc, svc.handle, bleak_uuid(svc.uuid))
            collection.add_service(service)
            for ch in svc.characteristics:
                props: list[Any] = [name for flag, name in _PROPERTY_NAMES if ch.properties & flag]
                char = BleakGATTCharacteristic(
                    ch,
                    ch.handle,
                    bleak_uuid(ch.uuid),
                    props,
                    lambda: mtu - 3,
                    service,
                )
                collection.add_characteristic(char)
                for d in ch.descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(d, d.handle, bleak_uuid(d.type), char)
                    )
        return collection

    def _on_disconnection(self, reason: int) -> None:
        _LOG.debug("%s: disconnected (HCI reason 0x%02x)", self.address, reason)
        self._connection = None
        self._peer = None
        self._subscribers.clear()
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        """Terminate the link (no-op when already down)."""
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(Exception):
            await connection.disconnect()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Pair over SMP (emulated sensors use Just Works)."""
        await self._require().connection.pair()

    async def unpair(self) -> None:
        """Forget keys; the virtual controller keeps none, so there is nothing to do."""

    def _require(self) -> Peer:
        if self._peer is None:
            raise BleakError(f"{self.address}: not connected")
        return self._peer

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """ATT read of a characteristic value."""
        return bytearray(await self._att(self._require().read_value(characteristic.obj)))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """ATT read of a descriptor."""
        return bytearray(await self._att(self._require().read_value(descriptor.obj)))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        """ATT write (request or command)."""
        await self._att(self._require().write_value(characteristic.obj, bytes(data), response))

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        """ATT write request to a descriptor."""
        await self._att(self._require().write_value(descriptor.obj, bytes(data), True))

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        """Write the CCCD and route notifications to the callback."""

        def deliver(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[characteristic.handle] = deliver
        await self._att(self._require().subscribe(characteristic.obj, deliver, prefer_notify=True))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Clear the CCCD."""
        deliver = self._subscribers.pop(characteristic.handle, None)
        await self._att(self._require().unsubscribe(characteristic.obj, deliver))

    @staticmethod
    async def _att(awaitable: Any) -> Any:
        try:
            return await awaitable
        except core.ProtocolError as exc:
            code = exc.error_code if isinstance(exc.error_code, int) else 0x0E
            raise BleakGATTProtocolError(code) from exc
        except core.BaseBumbleError as exc:
            raise BleakError(f"GATT operation failed: {exc}") from exc
