"""Hybrid logical clocks: stamps that follow causality even when device clocks disagree.

A stamp is (wall_time_ms, logical, node_id), compared in that order. `HybridClock.tick()`
stamps a local edit; `observe()` folds in a stamp seen from elsewhere so that an edit made
after seeing a value always stamps higher than it, whatever the local wall clock says.
The node id (the device id) is the deterministic tie-break between concurrent edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pulsesync.v1 import profiles_pb2

# The logical counter is a uint32 on the wire; it only grows while the wall clock stands
# still (or is behind a seen stamp), so overflowing it means something is badly wrong.
MAX_LOGICAL: Final = 2**32 - 1


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """One HLC stamp; ordering is the LWW order (wall time, then counter, then node)."""

    wall_time_ms: int
    logical: int
    node_id: str

    def __post_init__(self) -> None:
        if self.wall_time_ms < 0 or not 0 <= self.logical <= MAX_LOGICAL:
            raise ValueError(f"invalid stamp {self}")

    def to_proto(self) -> profiles_pb2.HybridTimestamp:
        """The wire form."""
        return profiles_pb2.HybridTimestamp(
            wall_time_ms=self.wall_time_ms, logical=self.logical, node_id=self.node_id
        )

    @classmethod
    def from_proto(cls, msg: profiles_pb2.HybridTimestamp) -> Stamp:
        """Read the wire form."""
        return cls(msg.wall_time_ms, msg.logical, msg.node_id)


ZERO: Final = Stamp(0, 0, "")


class HybridClock:
    """Issues stamps for one node: never backwards, always after everything observed."""

    def __init__(self, node_id: str, wall_ms: Callable[[], int]) -> None:
        if not node_id:
            raise ValueError("an HLC needs a node id (the device id)")
        self.node_id = node_id
        self._wall_ms = wall_ms
        self._last = Stamp(0, 0, node_id)

    @property
    def last(self) -> Stamp:
        """The latest stamp issued or observed (with this node's id)."""
        return self._last

    def tick(self) -> Stamp:
        """A fresh stamp for a local edit, greater than every stamp issued or observed."""
        wall = self._wall_ms()
        if wall > self._last.wall_time_ms:
            self._last = Stamp(wall, 0, self.node_id)
        else:
            self._last = Stamp(self._last.wall_time_ms, self._last.logical + 1, self.node_id)
        return self._last

    def observe(self, stamp: Stamp) -> None:
        """Fold in a stamp received from another node (receive rule, without ticking)."""
        if (stamp.wall_time_ms, stamp.logical) > (self._last.wall_time_ms, self._last.logical):
            self._last = Stamp(stamp.wall_time_ms, stamp.logical, self.node_id)
