"""What the person allows this device to collect: checked before an event is even queued."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from pulsesync.kinds import CONSENT_CATEGORIES
from pulsesync.v1 import common_pb2

ALL_CATEGORIES: frozenset[int] = frozenset(CONSENT_CATEGORIES)


class ConsentView(Protocol):
    """Answers whether a consent category (pulsesync.v1.ConsentCategory) is granted, now.

    Called on every recorded event, possibly from any thread: it must be cheap and non-blocking
    (a lookup in memory that a background task keeps up to date).
    """

    def allows(self, category: int) -> bool: ...


class StaticConsent:
    """A fixed set of granted categories (for the CLI, tests and in-process demos)."""

    __slots__ = ("granted",)

    def __init__(self, granted: Iterable[int] = ALL_CATEGORIES) -> None:
        self.granted = frozenset(granted)

    def allows(self, category: int) -> bool:
        """True when the category is in the granted set."""
        return category in self.granted

    def __repr__(self) -> str:
        names = sorted(common_pb2.ConsentCategory.Name(c) for c in self.granted)  # type: ignore[arg-type]
        return f"StaticConsent({names})"
