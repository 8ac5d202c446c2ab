"""The ingest pipeline: batch checks, consent, validation, skew correction, commit, ack.

    received = parse_upload(raw, ingest_pb2.UploadRequest)              # see received.py
    prepared = await pipeline.prepare(identity, received, received_us)  # in stream order
    response = await pipeline.finish(identity, prepared)                # after the commit

`prepare` runs for each batch in the order the device sent them and hands the valid events
to the group-commit writer; `finish` waits for the durable commit, publishes the committed
events and builds the ack. Splitting the two lets a stream validate its next batch while the
previous one is being committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Final

import grpc

from pulsesync import wire
from pulsesync.kinds import CATEGORY_OF_KIND
from pulsesync.server.bus import CommittedBatch, EventBus
from pulsesync.server.errors import PulseSyncError, Unavailable
from pulsesync.server.identity import Identity
from pulsesync.server.metrics import Metrics
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.timeline.received import Received
from pulsesync.server.timeline.skew import MAX_OFFSET_US, SkewEstimator
from pulsesync.server.timeline.validate import (
    KIND_OF_PAYLOAD,
    MAX_AGE_US,
    MAX_EVENT_ID_LENGTH,
    MAX_FUTURE_US,
    MAX_NAME_LENGTH,
    MAX_SEQ,
    PAYLOAD_CHECKS,
    SHORT_EVENT_CHECKS,
    Problem,
    check_time,
    validate_event,
)
from pulsesync.server.timeline.writer import (
    EventRow,
    EventWriter,
    Outcome,
    PendingBatch,
    QuarantineRow,
)
from pulsesync.timeutil import US_PER_HOUR, US_PER_MS, US_PER_S, timestamp_us
from pulsesync.v1 import common_pb2, events_pb2, ingest_pb2

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS: Final = wire.MAX_BATCH_EVENTS

_INVALID: Final = ingest_pb2.REJECTION_REASON_INVALID
_NO_CONSENT: Final = ingest_pb2.REJECTION_REASON_CONSENT_NOT_GRANTED
_CONFLICT: Final = ingest_pb2.REJECTION_REASON_SEQUENCE_CONFLICT
_INVALID_ARGUMENT_CODE: Final = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_NANOS: Final = 1_000_000_000
_NO_SEQ: Final = 1 << 64  # above every uint64 seq: the start of a running minimum
# Payload field name -> EventKind, and None (no known payload) -> 0, for the row's kind.
_KIND_OF: Final[dict[str | None, int]] = {None: 0}
_KIND_OF.update(KIND_OF_PAYLOAD)


@functools.lru_cache(maxsize=64)
def _allowed_payloads(granted: frozenset[int]) -> frozenset[str]:
    """The payload field names whose kind's consent category is among granted."""
    return frozenset(
        name for name, kind in KIND_OF_PAYLOAD.items() if CATEGORY_OF_KIND.get(kind) in granted
    )


def problem_of(
    ev: events_pb2.Event,
    which: str | None,
    body_size: int,
    envelope: tuple[int, str, int, int],
    t_us: int,
    received_us: int,
) -> Problem | None:
    """`validate_event`, with the checks skipped that a common event provably passes.

    An event with an id, a seq, a device time and a payload has a sound envelope without
    reading it again, and one whose serialized body is short cannot break a length limit
    (SHORT_EVENT_CHECKS). Anything odd takes the full definition. `envelope` is the event's
    (seq, event_id, device_time.seconds, device_time.nanos) as the caller read them once
    (each field read from a protobuf message costs as much as a check).
    tests/server/timeline/test_validation_paths.py holds the two equal.
    """
    seq, event_id, seconds, nanos = envelope
    if (
        seconds  # a set device_time (an unset one reads 0) past 1970: the fast path
        and 0 < seq <= MAX_SEQ
        and event_id
        and len(event_id) <= MAX_EVENT_ID_LENGTH
        and 0 <= nanos < _NANOS
        and which is not None
    ):
        if received_us - MAX_AGE_US <= t_us <= received_us + MAX_FUTURE_US:
            return (SHORT_EVENT_CHECKS if body_size <= MAX_NAME_LENGTH else PAYLOAD_CHECKS)[which](
                ev
            )
        return check_time(t_us, received_us)
    return validate_event(ev, t_us, received_us)


def envelope_of(ev: events_pb2.Event) -> tuple[int, str, int, int]:
    """(seq, event_id, device_time.seconds, device_time.nanos): what problem_of reads."""
    dt = ev.device_time
    return ev.seq, ev.event_id, dt.seconds, dt.nanos


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a whole batch was refused (nothing of it stored)."""

    reason: str
    message: str

    def detail(self) -> common_pb2.ErrorDetail:
        return common_pb2.ErrorDetail(
            code=_INVALID_ARGUMENT_CODE, reason=self.reason, message=self.message
        )


@dataclass(slots=True)
class Prepared:
    """A batch after validation: either answered at once or waiting for its commit."""

    batch_id: int
    received_at: float  # perf_counter() at receipt, for the ack latency
    clock_offset_us: int
    refusal: Refusal | None = None
    acked_through_seq: int = 0
    rejected: list[ingest_pb2.RejectedEvent] | None = None
    pending: asyncio.Future[Outcome] | None = None
    counts: tuple[int, int] = (0, 0)  # (invalid, consent not granted)
    seq_range: tuple[int, int] = (0, 0)  # lowest and highest seq of the batch's events


class IngestPipeline:
    """Turns upload batches into stored events and acks; one per server."""

    def __init__(
        self, writer: EventWriter, *, consent: ConsentStore, bus: EventBus, metrics: Metrics
    ) -> None:
        """writer: where validated batches are committed (the composition root chooses the
        backend's); consent: checked before storing; bus: told of every committed batch."""
        self.writer = writer
        self._consent = consent
        self._bus = bus
        self._metrics = metrics
        self.skew = SkewEstimator()
        self._persisted_offset: dict[int, int] = {}
        self._devices_of_user: dict[int, set[int]] = {}
        m = metrics
        self._m_accepted = m.ingest_events.labels("accepted")
        self._m_duplicate = m.ingest_events.labels("duplicate")
        self._m_invalid = m.ingest_events.labels("invalid")
        self._m_consent = m.ingest_events.labels("consent_not_granted")
        self._m_conflict = m.ingest_events.labels("sequence_conflict")
        self._m_batch_ok = m.ingest_batches.labels("committed")
        self._m_batch_refused = m.ingest_batches.labels("refused")
        self._m_batch_ping = m.ingest_batches.labels("empty")

    async def start(self) -> None:
        """Start the writer."""
        await self.writer.start()

    async def stop(self) -> None:
        """Commit what is queued and stop the writer."""
        await self.writer.stop()

    async def forget_user(self, user_id: int) -> None:
        """Erase hook: drop the person's devices' sequencing and clock state."""
        for device_pk in self._devices_of_user.pop(user_id, set()):
            self.writer.forget_device(device_pk)
            self.skew.forget(device_pk)
            self._persisted_offset.pop(device_pk, None)

    def _refuse(self, batch_id: int, received_at: float, offset: int, r: Refusal) -> Prepared:
        self._m_batch_refused.inc()
        return Prepared(batch_id, received_at, offset, refusal=r)

    async def prepare(self, me: Identity, received: Received, received_us: int) -> Prepared:
        """Check and validate one batch and queue its events for the writer."""
        received_at = time.perf_counter()
        batch = received.batch
        dev = me.device_pk
        uid = me.user_id
        known_offset = self.skew.estimate(dev) or 0
        if batch is None:
            return self._refuse(
                0,
                received_at,
                known_offset,
                Refusal("MISSING_BATCH", "the request has no batch; set UploadRequest.batch"),
            )
        events = batch.events
        n = len(events)
        if n > MAX_BATCH_EVENTS:
            return self._refuse(
                batch.batch_id,
                received_at,
                known_offset,
                Refusal(
                    "BATCH_TOO_LARGE",
                    f"the batch has {n} events; send at most {MAX_BATCH_EVENTS} per batch "
                    "(split it and resend)",
                ),
            )
        if n == 0:
            self._m_batch_ping.inc()
            if batch.HasField("sent_time") and self._plausible(received_us, batch):
                known_offset = self._observe(dev, received_us, batch)
            return Prepared(batch.batch_id, received_at, known_offset)
        if not batch.HasField("sent_time"):
            return self._refuse(
                batch.batch_id,
                received_at,
                known_offset,
                Refusal(
                    "MISSING_SENT_TIME",
                    "the batch has no sent_time; set it to the device clock at sending, "
                    "it is needed to correct clock skew",
                ),
            )
        if not self._plausible(received_us, batch):
            return self._refuse(
                batch.batch_id,
                received_at,
                known_offset,
                Refusal(
                    "IMPLAUSIBLE_SENT_TIME",
                    "the batch's sent_time is more than "
                    f"{MAX_OFFSET_US // US_PER_HOUR} hours away from the server's clock; "
                    "set the device clock (network time) and send it again",
                ),
            )
        self._devices_of_user.setdefault(uid, set()).add(dev)
        offset = self._observe(dev, received_us, batch)
        granted = await self._consent.granted(uid)
        allowed = _allowed_payloads(granted)

        rows: list[EventRow] = []
        quarantine: list[QuarantineRow] = []
        rejected: list[ingest_pb2.RejectedEvent] = []
        no_consent = 0
        settled: list[int] = []
        max_seq = 0
        min_seq = _NO_SEQ
        last_seq = 0
        in_order = True
        kind_of = _KIND_OF
        add_row = rows.append
        problem: Problem | None
        for ev, body in zip(events, received.bodies, strict=True):
            seq = ev.seq
            if seq > max_seq:
                max_seq = seq
            if seq < min_seq:
                min_seq = seq
            which = ev.WhichOneof("payload")
            if which is not None and which not in allowed:
                no_consent += 1
                if 0 < seq <= MAX_SEQ:
                    settled.append(seq)
                rejected.append(
                    ingest_pb2.RejectedEvent(
                        seq=seq,
                        event_id=ev.event_id[:MAX_EVENT_ID_LENGTH],
                        reason=_NO_CONSENT,
                        detail="consent for this kind of event is not granted; nothing was stored",
                    )
                )
                continue
            event_id = ev.event_id
            dt = ev.device_time
            seconds = dt.seconds
            nanos = dt.nanos
            t_us = seconds * US_PER_S + nanos // US_PER_MS + offset
            problem = problem_of(
                ev, which, len(body), (seq, event_id, seconds, nanos), t_us, received_us
            )
            if problem is not None:
                quarantine.append(
                    (
                        uid,
                        dev,
                        min(seq, MAX_SEQ),  # SEQ_TOO_LARGE: the exact value stays in the body
                        event_id[:MAX_EVENT_ID_LENGTH],
                        problem.code,
                        problem.detail,
                        received_us,
                        body,
                    )
                )
                rejected.append(
                    ingest_pb2.RejectedEvent(
                        seq=seq,
                        event_id=event_id[:MAX_EVENT_ID_LENGTH],
                        reason=_INVALID,
                        detail=problem.detail,
                    )
                )
                self._metrics.quarantined.labels(problem.code).inc()
                continue
            if seq <= last_seq:
                in_order = False
            last_seq = seq
            add_row((uid, dev, seq, t_us, kind_of[which], body, received_us))

        persist: int | None = None
        if self._persisted_offset.get(dev) != offset:
            persist = offset
            self._persisted_offset[dev] = offset
        pending = PendingBatch(dev, uid, received_us, rows, quarantine, in_order, persist, settled)
        self.writer.submit(pending)
        return Prepared(
            batch.batch_id,
            received_at,
            offset,
            rejected=rejected,
            pending=pending.future,
            counts=(len(quarantine), no_consent),
            seq_range=(min_seq, max_seq),
        )

    @staticmethod
    def _plausible(received_us: int, batch: ingest_pb2.EventBatch) -> bool:
        st = batch.sent_time
        return SkewEstimator.plausible(received_us, timestamp_us(st))

    def _observe(self, dev: int, received_us: int, batch: ingest_pb2.EventBatch) -> int:
        st = batch.sent_time
        return self.skew.observe(dev, received_us, timestamp_us(st))

    async def finish(self, me: Identity, p: Prepared) -> ingest_pb2.UploadResponse:
        """Wait for the batch's commit, publish its events and build the ack."""
        resp = ingest_pb2.UploadResponse(batch_id=p.batch_id)
        resp.clock_offset.FromMicroseconds(p.clock_offset_us)
        if p.refusal is not None:
            resp.error.CopyFrom(p.refusal.detail())
            return resp
        if p.pending is None:  # an empty batch: a ping
            return resp
        try:
            outcome = await p.pending
        except PulseSyncError:
            raise  # a full disk or a damaged file: not stored, and said so
        except Exception as e:
            # The events may or may not be stored; not acking makes the agent resend them and
            # deduplication makes that safe.
            raise Unavailable(
                "the server could not store the batch; resend it", reason="STORAGE_UNAVAILABLE"
            ) from e
        rejected = p.rejected or []
        for c in outcome.conflicts:
            rejected.append(
                ingest_pb2.RejectedEvent(
                    seq=c.seq, event_id=c.event_id, reason=_CONFLICT, detail=c.detail
                )
            )
        if outcome.conflicts:
            self._metrics.quarantined.labels("SEQUENCE_CONFLICT").inc(len(outcome.conflicts))
            self._m_conflict.inc(len(outcome.conflicts))
        resp.acked_through_seq = outcome.watermark
        resp.accepted_count = len(outcome.inserted)
        resp.duplicate_count = outcome.duplicates
        resp.rejected.extend(rejected)
        invalid, no_consent = p.counts
        self._m_accepted.inc(len(outcome.inserted))
        if outcome.duplicates:
            self._m_duplicate.inc(outcome.duplicates)
        if invalid:
            self._m_invalid.inc(invalid)
        if no_consent:
            self._m_consent.inc(no_consent)
        self._m_batch_ok.inc()
        if outcome.inserted:
            # The inserted rows are in CommittedEvent's field order: published as they are.
            self._bus.publish(me.user_id, CommittedBatch(outcome.inserted, outcome.derived))
        self._metrics.ack_latency.observe(time.perf_counter() - p.received_at)
        return resp
