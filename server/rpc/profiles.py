"""ProfileService: encrypted, mergeable profile snapshots with a live watch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pulsesync.server.context import RpcContext
from pulsesync.server.errors import FailedPrecondition
from pulsesync.server.identity import Identity
from pulsesync.server.privacy.consent import ConsentState, ConsentStore
from pulsesync.server.profiles.store import ProfileStore
from pulsesync.server.rpc.base import Idempotent, rpc_method
from pulsesync.v1 import common_pb2, profiles_pb2, profiles_pb2_grpc

_SYNC = common_pb2.CONSENT_CATEGORY_SYNC


def consent_required() -> FailedPrecondition:
    """The error for profile sync without the person's sync consent."""
    return FailedPrecondition(
        "profile sync needs the person's consent to sync between devices "
        "(CONSENT_CATEGORY_SYNC); grant it with PrivacyService.UpdateConsent (the app's "
        "privacy settings) and try again",
        reason="CONSENT_REQUIRED",
    )


class ProfileServicer(profiles_pb2_grpc.ProfileServiceServicer):
    def __init__(self, rpc: RpcContext, profiles: ProfileStore, consent: ConsentStore) -> None:
        self.rpc = rpc
        self.consent = consent
        self.profiles = profiles

    async def _require_sync(self, user_id: int) -> None:
        if _SYNC not in await self.consent.granted(user_id):
            raise consent_required()

    @rpc_method()
    async def GetProfile(
        self, request: Any, context: Any, me: Identity
    ) -> profiles_pb2.GetProfileResponse:
        return profiles_pb2.GetProfileResponse(profile=await self.profiles.get(me.user_id))

    @rpc_method(idempotent=Idempotent())
    async def UpdateProfile(
        self, request: Any, context: Any, me: Identity
    ) -> profiles_pb2.UpdateProfileResponse:
        await self._require_sync(me.user_id)
        result = await self.profiles.update(
            me.user_id,
            request.profile,
            request.edits,
            base_version=request.base_version,
            device_id=me.device_id,
        )
        return profiles_pb2.UpdateProfileResponse(
            profile=result.profile,
            overridden_fields=result.overridden_fields,
            committed=result.committed,
        )

    @rpc_method(stream=True)
    async def WatchProfile(
        self, request: Any, context: Any, me: Identity
    ) -> AsyncIterator[profiles_pb2.WatchProfileResponse]:
        await self._require_sync(me.user_id)
        store = self.profiles

        def on_consent(user_id: int, states: tuple[ConsentState, ...]) -> None:
            if not any(s.category == _SYNC and s.granted for s in states):
                store.interrupt_watches(user_id, consent_required())

        cancel = self.consent.watch(me.user_id, on_consent)
        try:
            async for profile in store.watch(me.user_id, request.after_version):
                yield profiles_pb2.WatchProfileResponse(profile=profile)
        finally:
            cancel()
