"""Where recorded events go on a device: the seam between event producers and the outbox."""

from __future__ import annotations

from typing import Protocol

from pulsesync.v1 import events_pb2


class EventSink(Protocol):
    """Accepts events without blocking the caller (an app's UI thread, a BLE callback).

    The sink fills in what the producer left empty: `event_id` (a UUID), `seq` (the device's
    next sequence number) and `device_time` (the host clock now). It drops events whose consent
    category the person has not granted.
    """

    def record(self, event: events_pb2.Event) -> None: ...
