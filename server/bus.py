"""In-process fan-out of committed events, for consumers that compute incrementally.

Ingest publishes each batch *after* it is durably committed; the nudge features and the
adaptive layout subscribe. Subscribers must be quick and must not raise: they run on the
ingest path (a slow one would slow acks). Heavy work belongs on a queue of the subscriber's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)


class CommittedEvent(NamedTuple):
    """An event as stored: who, which device, corrected time, kind and serialized body.

    A NamedTuple rather than a frozen dataclass: one is built per ingested event on the hot
    path, and a tuple is several times cheaper to build, with the same attribute access.
    """

    user_id: int
    device_pk: int
    seq: int
    t_us: int
    kind: int
    body: bytes


Subscriber = Callable[[int, Sequence[CommittedEvent]], None]


class EventBus:
    """Synchronous publish/subscribe of committed event batches, keyed by user."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call fn(user_id, events) after every commit; returns an unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def publish(self, user_id: int, events: Sequence[CommittedEvent]) -> None:
        for fn in list(self._subscribers):
            try:
                fn(user_id, events)
            except Exception:
                log.exception("event subscriber failed", extra={"subscriber": repr(fn)})
