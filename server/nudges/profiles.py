"""Where eligibility reads quiet hours, time zone and muted types: the profile store, or defaults."""

from __future__ import annotations

from typing import Any, Protocol

from pulsesync.server.nudges.catalog import PolicySettings
from pulsesync.server.nudges.eligibility import ContinuityRef, NudgeProfile


class ProfileSource(Protocol):
    """Gives the nudge-relevant part of a user's profile."""

    async def nudge_profile(self, user_id: int) -> NudgeProfile: ...


class DefaultProfiles:
    """The catalog's documented defaults, for users (or servers) without a profile."""

    def __init__(self, settings: PolicySettings) -> None:
        self._default = NudgeProfile(
            time_zone=settings.default_time_zone,
            quiet_start_min=settings.default_quiet_start_min,
            quiet_end_min=settings.default_quiet_end_min,
        )
        self.overrides: dict[int, NudgeProfile] = {}

    async def nudge_profile(self, user_id: int) -> NudgeProfile:
        return self.overrides.get(user_id, self._default)


class StoreProfiles:
    """Reads `store.get(user_id)` (a pulsesync.v1.Profile), falling back to defaults."""

    def __init__(self, store: Any, defaults: DefaultProfiles) -> None:
        self._store = store
        self._defaults = defaults

    async def nudge_profile(self, user_id: int) -> NudgeProfile:
        base = await self._defaults.nudge_profile(user_id)
        profile = await self._store.get(user_id)
        if profile is None:
            return base
        quiet = profile.quiet_hours if profile.HasField("quiet_hours") else None
        items = sorted(profile.continuity_items, key=lambda i: i.update_time.ToMicroseconds())
        last = items[-1] if items and items[-1].progress < 1.0 else None
        return NudgeProfile(
            time_zone=profile.time_zone or base.time_zone,
            quiet_start_min=quiet.start_minute if quiet else base.quiet_start_min,
            quiet_end_min=quiet.end_minute if quiet else base.quiet_end_min,
            muted=frozenset(profile.muted_nudge_types),
            continuity_title=(last.title or last.item_id) if last else None,
            daily_study_minutes=profile.goals.daily_study_minutes,
            continuity=ContinuityRef(
                last.app,
                last.item_id,
                last.title or last.item_id,
                last.position,
                last.progress,
                last.device_id,
            )
            if last
            else None,
        )


def profile_source(store: Any | None, settings: PolicySettings) -> ProfileSource:
    """The people's profiles from store (anything with `async get(user_id)`, the server's
    ProfileStore) when there is one, else the defaults."""
    defaults = DefaultProfiles(settings)
    if store is not None:
        return StoreProfiles(store, defaults)
    return defaults
