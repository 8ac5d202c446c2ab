"""What the nudge features fold from a committed batch, summarized beside the commit.

The features fold every committed event (see nudges/features.py): time range, the device's
last activity, steps per minute, heart-rate samples, the app in use. Reading every row for
that took about a tenth of the event loop's time under heavy ingest. The ingest writer process
has every row of a batch and a share of the other core, and runs a commit hook it is given by
name on each batch's inserted rows (timeline/committer.py); `summarize` is the hook the server
gives it (COMMIT_HOOK), so the fold reads the summary: a time range, the kinds present, the
steps per device and minute and where the app events are. Heart-rate rows are still read by
the fold, and only when a new 5-minute sample is due.

`summarize` runs in the writer process and returns plain tuples (they cross the pipe with
`marshal`); `BatchSummary.read(summary)` reads one on the server's side. The writer process
imports this module at startup, so it imports only the row type, the steps rule and the
event protobufs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import compress
from operator import itemgetter
from typing import Any, Final, NamedTuple

from pulsesync.server.bus import ROW_DEVICE_PK, ROW_KIND, ROW_T_US, CommittedRow
from pulsesync.server.timeline.steps import step_minute
from pulsesync.v1 import events_pb2

# The writer process's commit hook, by name (it is imported in that process).
COMMIT_HOOK: Final = "pulsesync.server.nudges.batch_summary:summarize"

STEPS: Final = events_pb2.EVENT_KIND_STEPS
# The kinds that tell which app is in use on a device (the last one in a batch wins).
APP_KINDS: Final = frozenset(
    {
        events_pb2.EVENT_KIND_FEATURE_USE,
        events_pb2.EVENT_KIND_SCREEN_VIEW,
        events_pb2.EVENT_KIND_SESSION_START,
    }
)
# Fields of a committed row (CommittedEvent's order), for C-level passes over a batch.
_DEVICE_PK: Final = itemgetter(ROW_DEVICE_PK)
_T_US: Final = itemgetter(ROW_T_US)
_KIND: Final = itemgetter(ROW_KIND)


def steps_by_minute(steps_rows: Iterable[CommittedRow]) -> dict[tuple[int, int], int]:
    """The counts of steps rows summed per (device, minute), in row order (see steps.py)."""
    steps: dict[tuple[int, int], int] = {}
    for _, device_pk, _, t_us, _, body, _ in steps_rows:
        key = (device_pk, step_minute(t_us))
        steps[key] = steps.get(key, 0) + events_pb2.Event.FromString(body).steps.count
    return steps


class BatchSummary(NamedTuple):
    """A committed batch as the features fold it."""

    earliest_us: int
    latest_us: int
    device_latest: tuple[tuple[int, int], ...]  # (device_pk, its latest t_us)
    kinds: frozenset[int]
    steps: tuple[tuple[int, int, int], ...]  # (device_pk, minute, steps), in row order
    app_rows: tuple[int, ...]  # indexes of the rows of APP_KINDS, in order

    @classmethod
    def read(cls, summary: Sequence[Any]) -> BatchSummary:
        """A summary from its plain tuple (as `summarize` returns it)."""
        earliest, latest, device_latest, kinds, steps, app_rows = summary
        return cls(earliest, latest, device_latest, frozenset(kinds), steps, app_rows)


def summarize(rows: Sequence[CommittedRow], device_pk: int | None = None) -> tuple[Any, ...] | None:
    """The summary of committed rows as plain tuples (see BatchSummary), None for no rows.

    device_pk: the device of every row, when the caller knows it (an ingest batch's).
    """
    if not rows:
        return None
    times = list(map(_T_US, rows))
    kinds = list(map(_KIND, rows))
    if device_pk is None:
        devices = set(map(_DEVICE_PK, rows))
        if len(devices) == 1:
            device_pk = devices.pop()
    if device_pk is not None:
        device_latest: tuple[tuple[int, int], ...] = ((device_pk, max(times)),)
    else:
        latest: dict[int, int] = {}
        for dev, t_us in zip(map(_DEVICE_PK, rows), times, strict=True):
            if dev not in latest or t_us > latest[dev]:
                latest[dev] = t_us
        device_latest = tuple(latest.items())
    present = set(kinds)
    steps: tuple[tuple[int, int, int], ...] = ()
    if STEPS in present:
        by_minute = steps_by_minute(compress(rows, map(STEPS.__eq__, kinds)))
        steps = tuple((dev, minute, n) for (dev, minute), n in by_minute.items())
    app_rows: tuple[int, ...] = ()
    if not APP_KINDS.isdisjoint(present):
        app_rows = tuple(compress(range(len(rows)), map(APP_KINDS.__contains__, kinds)))
    return (min(times), max(times), device_latest, tuple(sorted(present)), steps, app_rows)
