"""The uplink: streams the outbox to the server and deletes only what the server acknowledges.

One `IngestService.Upload` stream at a time. A sender reads committed events from the outbox
in sequence order and writes batches, keeping up to `window` batches in flight; a receiver
applies each ack (`acked_through_seq`: delete everything up to it) and logs rejected events.
The sender sleeps until the outbox reports an append, then lingers briefly to fill a batch.

Any failure ends the stream; the error is classified (client.classify) and, unless the token
was refused, the uplink reconnects after a full-jitter exponential backoff and resends
everything still in the outbox, from the lowest seq. The server dedupes on (device, seq), so
resending is always safe and nothing committed to the outbox is ever lost.

With several server addresses (replicas, servers.py) each reconnect after a failure goes to
the next address, so a dead replica costs one backoff delay before the survivor takes over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import grpc

from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.clock import Clock, SystemClock
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.errors import AgentError, OutboxError, translate
from pulsesync.edge_agent.outbox import Outbox
from pulsesync.edge_agent.retry import Backoff
from pulsesync.edge_agent.servers import ServerRotation

__all__ = ["Backoff", "Uplink", "UplinkStats"]
from pulsesync.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from pulsesync.wire import STREAM_OPEN

log = logging.getLogger(__name__)

BATCH_TOO_LARGE: Final = "BATCH_TOO_LARGE"
# An event whose device time differs from (now - its monotonic age) by more than this was
# recorded before a wall-clock step; smaller differences (clock slew, reading jitter) leave
# the recorded time untouched.
CLOCK_STEP_US: Final = 1_000_000


class _StreamEnded(Exception):
    """The stream ended without a gRPC error; reconnect."""


class _CallEnded(Exception):
    """A write found the RPC already over; carries the call's final status to classify."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _BatchRefused(Exception):
    """The server refused a whole batch for a reason other than its size."""


@dataclass(slots=True)
class _Inflight:
    first_seq: int
    last_seq: int
    count: int
    sent_at: float
    epoch: int


@dataclass(slots=True)
class _Stream:
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[int, _Inflight] = field(default_factory=dict)
    rewind_to: int | None = None
    # Bumped by each refused batch. Acks of batches read from the outbox in an earlier epoch
    # may only cover seqs below the refused one: the server acks a batch's highest seq, and
    # that must not vouch for the refused events, which were never stored.
    epoch: int = 0
    stale_ack_cap: int = 0


@dataclass(frozen=True, slots=True)
class UplinkStats:
    """Counters since start and the state of the current stream."""

    connected: bool
    acked_through: int
    batches_sent: int
    events_sent: int
    acks: int
    reconnects: int
    rejected: int
    batch_size: int
    clock_offset_us: int
    last_ack_latency_s: float | None
    last_error: str | None
    # The address the uplink uses (or will use next): with several replicas, which one.
    server: str = ""


ChannelFactory = Callable[[], grpc.aio.Channel]
Sleep = Callable[[float], Awaitable[object]]
_UploadCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[ingest_pb2.UploadRequest, ingest_pb2.UploadResponse]"
)


class Uplink:
    """Streams an Outbox to the server's IngestService; `await uplink.run()` until cancelled.

    `run` raises PairingRequired when the server refuses the token and AgentError when
    retrying cannot help; every other failure is retried.
    """

    def __init__(
        self,
        outbox: Outbox,
        credentials: Credentials,
        *,
        settings: AgentSettings | None = None,
        clock: Clock | None = None,
        connect: ChannelFactory | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_ack: Callable[[ingest_pb2.UploadResponse], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.credentials = credentials
        self.settings = settings or AgentSettings()
        self.batch_size = self.settings.batch_size
        self._clock: Clock = clock or SystemClock()
        self.servers: ServerRotation = credentials.rotation()
        self._connect: ChannelFactory = connect or (
            lambda: credentials.channel(self.servers.current)
        )
        self.backoff = Backoff(self.settings.backoff_base_s, self.settings.backoff_cap_s, rng=rng)
        self._sleep = sleep
        self._monotonic = monotonic
        self._on_ack = on_ack
        self._next_batch_id = 1
        self._connected = False
        self._batches = self._events = self._acks = self._reconnects = self._rejected = 0
        self._clock_offset_us = 0
        self._ack_latency: float | None = None
        self._last_error: str | None = None

    def stats(self) -> UplinkStats:
        """A snapshot of the counters."""
        return UplinkStats(
            connected=self._connected,
            acked_through=self.outbox.acked_through,
            batches_sent=self._batches,
            events_sent=self._events,
            acks=self._acks,
            reconnects=self._reconnects,
            rejected=self._rejected,
            batch_size=self.batch_size,
            clock_offset_us=self._clock_offset_us,
            last_ack_latency_s=self._ack_latency,
            last_error=self._last_error,
            server=self.servers.current,
        )

    async def run(self) -> None:
        """Stream until cancelled, reconnecting with backoff after every retryable failure."""
        while True:
            started = self._monotonic()
            try:
                await self._stream_once()
            except (grpc.aio.AioRpcError, _CallEnded) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else e.code
                detail = (e.details() if isinstance(e, grpc.aio.AioRpcError) else e.details) or ""
                err = translate(code, detail, server=self.servers.current, what="uploading events")
                if isinstance(err, AgentError):
                    raise err from e
                detail = detail or code.name
                self._last_error = f"{code.name}: {detail}"
            except (_StreamEnded, _BatchRefused, TimeoutError, OSError) as e:
                self._last_error = str(e) or type(e).__name__
            except OutboxError:
                raise  # a damaged outbox or a full disk: reconnecting cannot help
            except Exception as e:  # a surprise: keep the data flowing, but make it visible
                log.exception("upload stream failed unexpectedly")
                self._last_error = f"{type(e).__name__}: {e}"
            finally:
                self._connected = False
            if self._monotonic() - started >= self.settings.healthy_period_s:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self._reconnects += 1
            failed = self.servers.current
            log.warning(
                "upload stream to %s ended (%s); reconnecting to %s in %.2f s",
                failed,
                self._last_error,
                self.servers.advance(),
                delay,
            )
            await self._sleep(delay)

    # -- one stream -------------------------------------------------------------------------
    async def _stream_once(self) -> None:
        channel = self._connect()
        state = _Stream()
        remove = self.outbox.add_listener(state.kick.set)
        # No request iterator: the sender writes with call.write() as batches become ready.
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.Upload(metadata=self.credentials.metadata)  # type: ignore[call-arg]
        try:
            await self._accepted(call)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send(call, state), name="uplink-send")
                tg.create_task(self._receive(call, state), name="uplink-receive")
                tg.create_task(self._watchdog(state), name="uplink-watchdog")
        except BaseExceptionGroup as group:
            raise _most_telling(group) from None
        finally:
            remove()
            call.cancel()
            await channel.close(None)

    async def _accepted(self, call: _UploadCall) -> None:
        """Wait until the server has accepted the stream (see pulsesync.wire.STREAM_OPEN).

        A refused stream then ends with the server's own status (UNAUTHENTICATED for a revoked
        token) instead of the INTERNAL that a write racing the refusal would report.
        """
        async with asyncio.timeout(self.settings.ack_timeout_s):
            metadata = await call.initial_metadata()
        if STREAM_OPEN not in list(metadata or ()):
            raise _CallEnded(await call.code(), await call.details() or "")

    async def _send(self, call: _UploadCall, state: _Stream) -> None:
        after = 0  # a new stream resends everything still in the outbox
        while True:
            state.kick.clear()
            if state.rewind_to is not None:
                after, state.rewind_to = min(after, state.rewind_to), None
            if len(state.inflight) >= self.settings.window:
                await state.kick.wait()
                continue
            epoch = state.epoch
            aged = await self.outbox.pending_with_age(after, self.batch_size)
            events = [event for event, _ in aged]
            if state.epoch != epoch:
                continue  # a batch was refused meanwhile: these may be past the rewind point
            if not events:
                await state.kick.wait()
                if self.settings.uplink_linger_s > 0:
                    await asyncio.sleep(self.settings.uplink_linger_s)
                continue
            await self._write(call, state, aged, epoch)
            after = events[-1].seq

    async def _write(
        self,
        call: _UploadCall,
        state: _Stream,
        aged: list[tuple[events_pb2.Event, int | None]],
        epoch: int,
    ) -> None:
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        request = ingest_pb2.UploadRequest()
        request.batch.batch_id = batch_id
        now_us = self._clock.now_us()
        request.batch.sent_time.FromMicroseconds(now_us)
        events = [_true_time(event, age_us, now_us) for event, age_us in aged]
        request.batch.events.extend(events)
        state.inflight[batch_id] = _Inflight(
            events[0].seq, events[-1].seq, len(events), self._monotonic(), epoch
        )
        log.debug("batch %d: seq %d..%d", batch_id, events[0].seq, events[-1].seq)
        try:
            await call.write(request)
        except asyncio.InvalidStateError:
            raise _CallEnded(await call.code(), await call.details() or "") from None
        self._batches += 1
        self._events += len(events)

    async def _receive(self, call: _UploadCall, state: _Stream) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise _StreamEnded("the server ended the upload stream")
            assert isinstance(response, ingest_pb2.UploadResponse)
            self._connected = True
            sent = state.inflight.pop(response.batch_id, None)
            if sent is not None:
                self._ack_latency = self._monotonic() - sent.sent_at
            if response.HasField("error") and response.error.reason:
                self._refused(response, sent, state)
            if response.rejected:
                self._log_rejected(response)
            acked = response.acked_through_seq
            if state.epoch and (sent is None or sent.epoch < state.epoch):
                acked = min(acked, state.stale_ack_cap)
            log.debug(
                "batch %d: acked through %d (applied %d)",
                response.batch_id,
                response.acked_through_seq,
                acked,
            )
            if acked > self.outbox.acked_through:
                await self.outbox.ack(acked)
            if response.HasField("clock_offset"):
                self._clock_offset_us = response.clock_offset.ToMicroseconds()
            self._acks += 1
            if self._on_ack is not None:
                self._on_ack(response)
            state.kick.set()

    def _log_rejected(self, response: ingest_pb2.UploadResponse) -> None:
        """One warning per batch (count per reason, first detail); each event at debug."""
        self._rejected += len(response.rejected)
        by_reason = Counter(ingest_pb2.RejectionReason.Name(r.reason) for r in response.rejected)
        first = response.rejected[0]
        log.warning(
            "server rejected %d events of batch %d (%s); e.g. seq %d: %s",
            len(response.rejected),
            response.batch_id,
            ", ".join(
                f"{n} {reason.removeprefix('REJECTION_REASON_')}" for reason, n in by_reason.items()
            ),
            first.seq,
            first.detail,
        )
        for r in response.rejected:
            log.debug(
                "rejected seq=%d id=%s: %s (%s)",
                r.seq,
                r.event_id,
                ingest_pb2.RejectionReason.Name(r.reason),
                r.detail,
            )

    def _refused(
        self, response: ingest_pb2.UploadResponse, sent: _Inflight | None, state: _Stream
    ) -> None:
        error = response.error
        if error.reason != BATCH_TOO_LARGE:
            raise _BatchRefused(f"batch refused: {error.reason}: {error.message}")
        size = sent.count if sent is not None else self.batch_size
        smaller = max(1, min(self.batch_size, size // 2))
        if smaller < self.batch_size:
            log.warning(
                "server refused a batch of %d events as too large; sending %d per batch",
                size,
                smaller,
            )
            self.batch_size = smaller
        # Nothing of the refused batch was stored: send again from the last acked seq, and
        # distrust acks of batches already in flight beyond the refused batch's first seq.
        state.rewind_to = self.outbox.acked_through
        cap = sent.first_seq - 1 if sent is not None else self.outbox.acked_through
        if state.epoch:
            cap = min(cap, state.stale_ack_cap)
        state.epoch, state.stale_ack_cap = state.epoch + 1, cap

    async def _watchdog(self, state: _Stream) -> None:
        timeout = self.settings.ack_timeout_s
        while True:
            await asyncio.sleep(timeout / 4)
            if state.inflight:
                oldest = min(i.sent_at for i in state.inflight.values())
                if self._monotonic() - oldest > timeout:
                    raise TimeoutError(f"no ack for {timeout:g} s: the connection looks dead")


def _true_time(event: events_pb2.Event, age_us: int | None, now_us: int) -> events_pb2.Event:
    """The event with its device time as `now - age` when the wall clock was stepped since it
    was recorded (in this boot), so the server's skew correction places it right."""
    if age_us is not None:
        true_us = now_us - age_us
        if abs(true_us - event.device_time.ToMicroseconds()) > CLOCK_STEP_US:
            event.device_time.FromMicroseconds(true_us)
    return event


def _most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to classify from a failed stream: a gRPC status beats everything else."""
    leaves: list[BaseException] = []

    def walk(g: BaseException) -> None:
        if isinstance(g, BaseExceptionGroup):
            for e in g.exceptions:
                walk(e)
        else:
            leaves.append(g)

    walk(group)
    for e in leaves:
        if isinstance(e, grpc.aio.AioRpcError | _CallEnded):
            return e
    for e in leaves:
        if not isinstance(e, asyncio.CancelledError):
            return e
    return leaves[0]
