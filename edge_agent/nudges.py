"""The device side of nudges: keep a SubscribeNudges stream open, show each nudge, report feedback.

    receiver = NudgeReceiver(credentials, presenter)
    await receiver.run()      # reconnects with capped backoff until cancelled

A `Presenter` shows a nudge (a notification, a banner) and returns what the person did;
the receiver reports DELIVERED at once and then each action through RecordNudgeFeedback.
Each report carries its own request_id, reused on its retries, so a report whose answer was
lost is not counted twice. With several server addresses, a lost stream reconnects to the next.
Outcomes such as steps afterwards are measured by the server, never sent from here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Protocol

import grpc
from google.protobuf import timestamp_pb2

from pulsesync.edge_agent import retry
from pulsesync.edge_agent.calls import mutate
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.errors import AgentError, translate_rpc
from pulsesync.edge_agent.retry import Backoff
from pulsesync.v1 import events_pb2, nudges_pb2, nudges_pb2_grpc

log = logging.getLogger(__name__)

FEEDBACK_TIMEOUT_S: Final = 10.0


class Presenter(Protocol):
    """Shows a nudge to the person; returns the actions they took (OPENED, DISMISSED, ACTED)."""

    async def show(self, nudge: nudges_pb2.Nudge) -> Sequence[int]: ...


class NudgeReceiver:
    """Subscribes to the device's nudges with reconnect, shows them, reports feedback."""

    def __init__(
        self, credentials: Credentials, presenter: Presenter, *, backoff: Backoff | None = None
    ) -> None:
        self._server = credentials.server
        self._credentials = credentials
        self._presenter = presenter
        # Reconnect quickly after a blip, but never hammer a server that is down.
        self._backoff = backoff or retry.WATCH.backoff()
        self._rotation = credentials.rotation()
        self.received: int = 0

    async def run(self) -> None:
        """Until cancelled: subscribe, handle nudges, reconnect after failures."""
        while True:
            try:
                await self._subscribe_once()
            except grpc.aio.AioRpcError as e:
                err = translate_rpc(e, server=self._server, what="receiving nudges")
                if isinstance(err, AgentError):
                    raise err from e
                log.info("nudge stream lost; reconnecting", extra={"code": e.code().name})
                self._rotation.advance()
                await self._backoff.wait()

    async def _subscribe_once(self) -> None:
        async with self._credentials.channel(self._rotation.current) as channel:
            stub = nudges_pb2_grpc.NudgeServiceStub(channel)
            call = stub.SubscribeNudges(
                nudges_pb2.SubscribeNudgesRequest(), metadata=self._credentials.metadata
            )
            async for resp in call:
                self._backoff.reset()
                self.received += 1
                await self._feedback(stub, resp.nudge.nudge_id, events_pb2.NUDGE_ACTION_DELIVERED)
                for action in await self._presenter.show(resp.nudge):
                    await self._feedback(stub, resp.nudge.nudge_id, action)
        # The server ended the stream (a newer one of this device took over): reconnect.
        await self._backoff.wait()

    async def _feedback(self, stub: Any, nudge_id: str, action: int) -> None:
        ts = timestamp_pb2.Timestamp()
        ts.GetCurrentTime()

        async def invoke(
            req: nudges_pb2.RecordNudgeFeedbackRequest,
        ) -> nudges_pb2.RecordNudgeFeedbackResponse:
            response: nudges_pb2.RecordNudgeFeedbackResponse = await stub.RecordNudgeFeedback(
                req, metadata=self._credentials.metadata, timeout=FEEDBACK_TIMEOUT_S
            )
            return response

        await mutate(
            invoke,
            nudges_pb2.RecordNudgeFeedbackRequest(nudge_id=nudge_id, action=action, action_time=ts),  # type: ignore[arg-type]
            what="nudge feedback",
        )
