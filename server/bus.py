"""In-process fan-out of committed events, for consumers that compute incrementally.

Ingest publishes each batch *after* it is durably committed; the nudge features and the
adaptive layout subscribe. Subscribers must be quick and must not raise: they run on the
ingest path (a slow one would slow acks). Heavy work belongs on a queue of the subscriber's;
keep the published sequence itself on that queue (see CommittedBatch for why).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Container, Iterator, Sequence
from itertools import compress
from operator import itemgetter
from typing import Any, Final, NamedTuple, overload

log = logging.getLogger(__name__)


class CommittedEvent(NamedTuple):
    """An event as stored: who, which device, corrected time, kind and serialized body.

    A NamedTuple rather than a frozen dataclass: one is built per ingested event on the hot
    path, and a tuple is several times cheaper to build, with the same attribute access. The
    fields are in the order of ingest's INSERT columns, so that a row becomes one in place
    (see CommittedBatch).
    """

    user_id: int
    device_pk: int
    seq: int
    t_us: int
    kind: int
    body: bytes
    received_us: int = 0  # server time of receipt


# A committed row in CommittedEvent's field order, as ingest inserts it.
CommittedRow = tuple[int, int, int, int, int, bytes, int]
# Positions of a CommittedRow's fields, for code that reads plain rows without building
# CommittedEvents (the writer process, the nudge fold).
ROW_DEVICE_PK: Final = 1
ROW_SEQ: Final = 2
ROW_T_US: Final = 3
ROW_KIND: Final = 4
ROW_BODY: Final = 5

_as_event: Final = functools.partial(tuple.__new__, CommittedEvent)
_KIND: Final = itemgetter(ROW_KIND)


def rows_of_kinds(rows: Sequence[CommittedRow], kinds: Container[int]) -> Iterator[CommittedRow]:
    """The rows of these kinds, in order (picked in one C-level pass over the kinds)."""
    return compress(rows, map(kinds.__contains__, map(_KIND, rows)))


class CommittedBatch(Sequence[CommittedEvent]):
    """The events of one committed batch: plain row tuples, CommittedEvents built on access.

    Why not a list of CommittedEvents: subscribers keep batches until they get to them (the
    nudge features fold them in every few seconds), and CPython's cyclic GC untracks plain
    tuples of ints and bytes but never a tuple subclass, so every retained CommittedEvent would
    be traversed by every full collection. Built on access, a CommittedEvent lives as long as
    the subscriber's loop iteration.
    """

    __slots__ = ("_rows", "derived")

    def __init__(self, rows: list[CommittedRow], derived: Any = None) -> None:
        self._rows = rows
        # What the ingest writer process's commit hook made of these rows (for the nudge
        # features, nudges/batch_summary.py), or None.
        self.derived = derived

    @property
    def rows(self) -> Sequence[CommittedRow]:
        """The plain rows, in CommittedEvent's field order (they unpack the same way)."""
        return self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> CommittedEvent: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[CommittedEvent]: ...

    def __getitem__(self, i: int | slice) -> CommittedEvent | Sequence[CommittedEvent]:
        if isinstance(i, slice):
            return CommittedBatch(self._rows[i])
        return _as_event(self._rows[i])

    def __iter__(self) -> Iterator[CommittedEvent]:
        return map(_as_event, self._rows)

    def of_kinds(self, kinds: Container[int]) -> Iterator[CommittedEvent]:
        """The events of these kinds; rows of other kinds are never turned into events."""
        return map(_as_event, rows_of_kinds(self._rows, kinds))


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
