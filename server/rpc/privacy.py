"""PrivacyService: consent, summary, export and erasure for the calling user.

Every method acts on the user behind the caller's token (`me.user_id`); no request carries
a user, so a device can only ever see or change its own person's data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.identity import Identity
from pulsesync.server.privacy.audit import Actor
from pulsesync.server.privacy.center import PrivacyCenter
from pulsesync.server.privacy.consent import CURRENT_POLICY_VERSION, ConsentState, ConsentStore
from pulsesync.server.privacy.erasure import ERASE_CONFIRMATION, DeletionReceipt
from pulsesync.server.privacy.summary import PrivacySummary
from pulsesync.server.rpc.base import Idempotent, rpc_method
from pulsesync.server.rpc.convert import duration, ts
from pulsesync.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc

log = logging.getLogger(__name__)

MAX_POLICY_VERSION_LENGTH: Final = 64


def consent_message(s: ConsentState) -> privacy_pb2.Consent:
    """The API form of one category's state."""
    msg = privacy_pb2.Consent(
        category=common_pb2.ConsentCategory.ValueType(s.category),
        granted=s.granted,
        policy_version=s.policy_version,
        device_id=s.device_id,
    )
    if s.change_us is not None:
        msg.update_time.CopyFrom(ts(s.change_us))
    return msg


def summary_message(s: PrivacySummary) -> privacy_pb2.GetPrivacySummaryResponse:
    """The API form of a summary."""
    resp = privacy_pb2.GetPrivacySummaryResponse(
        consents=[consent_message(c) for c in s.consents],
        nudges_sent=s.nudges_sent,
        device_count=s.device_count,
        record_counts=s.record_counts,
    )
    for cat in s.categories:
        msg = resp.categories.add(
            category=common_pb2.ConsentCategory.ValueType(cat.category),
            record_count=cat.record_count,
            device_ids=cat.device_ids,
        )
        if cat.first_us is not None:
            msg.first_time.CopyFrom(ts(cat.first_us))
        if cat.last_us is not None:
            msg.last_time.CopyFrom(ts(cat.last_us))
        if cat.retention_us is not None:
            msg.retention.CopyFrom(duration(cat.retention_us))
    if s.last_activity_us is not None:
        resp.last_activity_time.CopyFrom(ts(s.last_activity_us))
    return resp


def receipt_message(r: DeletionReceipt) -> privacy_pb2.DeletionReceipt:
    """The API form of a deletion receipt."""
    return privacy_pb2.DeletionReceipt(
        receipt_id=r.receipt_id,
        erase_time=ts(r.erase_us),
        deleted_counts=r.deleted_counts,
        signature=r.signature,
        subject_salt=r.subject_salt,
        subject_hash=r.subject_hash,
    )


class PrivacyServicer(privacy_pb2_grpc.PrivacyServiceServicer):
    def __init__(self, rpc: RpcContext, center: PrivacyCenter, consent: ConsentStore) -> None:
        self.rpc = rpc
        self.consent = consent
        self.center = center

    @rpc_method()
    async def GetConsents(
        self, request: privacy_pb2.GetConsentsRequest, context: Any, me: Identity
    ) -> privacy_pb2.GetConsentsResponse:
        states = await self.consent.states(me.user_id)
        return privacy_pb2.GetConsentsResponse(consents=[consent_message(s) for s in states])

    @rpc_method(idempotent=Idempotent())
    async def UpdateConsent(
        self, request: privacy_pb2.UpdateConsentRequest, context: Any, me: Identity
    ) -> privacy_pb2.UpdateConsentResponse:
        policy = request.policy_version.strip() or CURRENT_POLICY_VERSION
        if len(policy) > MAX_POLICY_VERSION_LENGTH:
            raise InvalidArgument(
                f"policy_version is longer than {MAX_POLICY_VERSION_LENGTH} characters; send "
                "the version label of the policy text the person was shown",
                reason="FIELD_TOO_LONG",
            )
        state = await self.consent.set(
            me.user_id, request.category, request.granted, device_id=me.device_id,
            policy_version=policy,
        )  # fmt: skip
        return privacy_pb2.UpdateConsentResponse(consent=consent_message(state))

    @rpc_method(stream=True)
    async def WatchConsents(
        self, request: privacy_pb2.WatchConsentsRequest, context: Any, me: Identity
    ) -> AsyncIterator[privacy_pb2.WatchConsentsResponse]:
        latest: list[tuple[ConsentState, ...]] = []
        changed = asyncio.Event()

        def on_change(_: int, states: tuple[ConsentState, ...]) -> None:
            latest[:] = [states]  # only the newest state matters: coalesce bursts
            changed.set()

        cancel = self.consent.watch(me.user_id, on_change)  # before reading: miss nothing
        try:
            sent = await self.consent.states(me.user_id)
            yield privacy_pb2.WatchConsentsResponse(consents=[consent_message(s) for s in sent])
            while True:
                await changed.wait()
                changed.clear()
                if latest and latest[0] != sent:
                    sent = latest[0]
                    yield privacy_pb2.WatchConsentsResponse(
                        consents=[consent_message(s) for s in sent]
                    )
        finally:
            cancel()

    @rpc_method(heavy=True)
    async def GetPrivacySummary(
        self, request: privacy_pb2.GetPrivacySummaryRequest, context: Any, me: Identity
    ) -> privacy_pb2.GetPrivacySummaryResponse:
        return summary_message(await self.center.summary(me.user_id, Actor.DEVICE))

    @rpc_method(stream=True, heavy=True)
    async def ExportData(
        self, request: privacy_pb2.ExportDataRequest, context: Any, me: Identity
    ) -> AsyncIterator[privacy_pb2.ExportDataResponse]:
        async for name, chunk in self.center.export(me.user_id, Actor.DEVICE):
            yield privacy_pb2.ExportDataResponse(file_name=name, chunk=chunk)

    @rpc_method()
    async def EraseData(
        self, request: privacy_pb2.EraseDataRequest, context: Any, me: Identity
    ) -> privacy_pb2.EraseDataResponse:
        if request.confirmation != ERASE_CONFIRMATION:
            raise InvalidArgument(
                f'confirmation must be "{ERASE_CONFIRMATION}": erasure deletes all of this '
                "person's data on every device and cannot be undone",
                reason="CONFIRMATION_REQUIRED",
            )
        receipt, _ = await self.center.erase(me.user_id, Actor.DEVICE)
        return privacy_pb2.EraseDataResponse(receipt=receipt_message(receipt))
