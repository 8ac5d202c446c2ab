"""Per-bucket activity aggregates over timeline events: steps, heart rate, HRV, app time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from pulsesync.hrv import pooled_rmssd_ms
from pulsesync.server.timeline.steps import StepMinutes
from pulsesync.v1 import events_pb2

if TYPE_CHECKING:
    from pulsesync.server.timeline.store import StoredEvent

# The kinds whose payloads feed the aggregates; others only count.
SUMMARY_KINDS: Final = frozenset(
    {
        events_pb2.EVENT_KIND_STEPS,
        events_pb2.EVENT_KIND_HEART_RATE,
        events_pb2.EVENT_KIND_SCREEN_VIEW,
        events_pb2.EVENT_KIND_FEATURE_USE,
    }
)


@dataclass(frozen=True, slots=True)
class ActivityBucket:
    """Aggregates of one bucket [start_us, start_us + width)."""

    start_us: int
    steps: int = 0
    mean_heart_rate_bpm: float = 0.0
    hrv_rmssd_ms: float = 0.0
    app_time_us: Mapping[str, int] = field(default_factory=dict)
    event_count: int = 0


@dataclass(slots=True)
class _Acc:
    bpm_sum: int = 0
    bpm_n: int = 0
    # RR intervals per (device, sensor): successive differences only make sense within one
    # sensor's beat-to-beat series.
    rr: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    app_us: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    count: int = 0


def summarize_events(
    events: Iterable[StoredEvent],
    start_us: int,
    end_us: int,
    bucket_us: int,
    counts: Mapping[int, int] | None = None,
) -> list[ActivityBucket]:
    """Buckets covering [start_us, end_us) from events in timeline order.

    Steps follow the rule in timeline/steps.py (per minute, the largest device's count), so
    Steps events over `steps.event_span(start_us, end_us)` are read, even just outside the range.
    counts (bucket index -> events) overrides the event counts when the caller passed only
    the kinds in SUMMARY_KINDS but knows how many events of every kind each bucket holds.
    """
    n_buckets = max(0, -(-(end_us - start_us) // bucket_us))
    accs = [_Acc() for _ in range(n_buckets)]
    minutes = StepMinutes()
    for ev in events:
        which = ev.event.WhichOneof("payload")
        if which == "steps":
            minutes.add(ev.device_id, ev.t_us, ev.event.steps.count)
        if not start_us <= ev.t_us < end_us:
            continue
        acc = accs[(ev.t_us - start_us) // bucket_us]
        acc.count += 1
        if which == "heart_rate":
            hr = ev.event.heart_rate
            if hr.HasField("bpm"):  # absent: not measured, not a 0 bpm reading
                acc.bpm_sum += hr.bpm
                acc.bpm_n += 1
            if hr.rr_intervals_ms:
                acc.rr[(ev.device_id, hr.sensor_id)].extend(hr.rr_intervals_ms)
        elif which == "screen_view":
            sv = ev.event.screen_view
            acc.app_us[sv.app] += sv.dwell.ToMicroseconds()
        elif which == "feature_use":
            fu = ev.event.feature_use
            acc.app_us[fu.app] += fu.duration.ToMicroseconds()
    return [
        ActivityBucket(
            start_us=start_us + i * bucket_us,
            steps=steps,
            mean_heart_rate_bpm=acc.bpm_sum / acc.bpm_n if acc.bpm_n else 0.0,
            hrv_rmssd_ms=pooled_rmssd_ms(acc.rr.values()) or 0.0,
            app_time_us=dict(acc.app_us),
            event_count=acc.count if counts is None else counts.get(i, 0),
        )
        for i, (acc, steps) in enumerate(
            zip(accs, minutes.per_bucket(start_us, end_us, bucket_us), strict=True)
        )
    ]
