"""Event kinds, device kinds and consent categories, and the category each event kind needs:
shared by the server and the agents."""

from __future__ import annotations

from typing import Final

from pulsesync.v1 import common_pb2, events_pb2

# Which consent an event kind needs. A kind missing here is refused on both sides, so adding
# an event kind to the API forces a decision about its category (a test checks coverage).
CATEGORY_OF_KIND: Final[dict[int, int]] = {
    events_pb2.EVENT_KIND_SCREEN_VIEW: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_TAP: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_FEATURE_USE: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_SEARCH: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_SESSION_START: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_SESSION_END: common_pb2.CONSENT_CATEGORY_BEHAVIOR,
    events_pb2.EVENT_KIND_HEART_RATE: common_pb2.CONSENT_CATEGORY_ACTIVITY,
    events_pb2.EVENT_KIND_STEPS: common_pb2.CONSENT_CATEGORY_ACTIVITY,
    events_pb2.EVENT_KIND_CADENCE: common_pb2.CONSENT_CATEGORY_ACTIVITY,
    events_pb2.EVENT_KIND_BATTERY: common_pb2.CONSENT_CATEGORY_ACTIVITY,
    events_pb2.EVENT_KIND_OXYGEN_SATURATION: common_pb2.CONSENT_CATEGORY_ACTIVITY,
    events_pb2.EVENT_KIND_NUDGE_INTERACTION: common_pb2.CONSENT_CATEGORY_PERSONALIZATION,
}

_NUMBER_OF_FIELD: Final[dict[str, int]] = {
    f.name: f.number for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields
}


def kind_of(event: events_pb2.Event) -> int:
    """The EventKind of an event (its payload's field number), or 0 when no payload is set."""
    name = event.WhichOneof("payload")
    if name is None:
        return events_pb2.EVENT_KIND_UNSPECIFIED
    return _NUMBER_OF_FIELD[name]


def category_of(event: events_pb2.Event) -> int:
    """The consent category an event needs, or 0 (unspecified) for an unknown kind."""
    return CATEGORY_OF_KIND.get(kind_of(event), common_pb2.CONSENT_CATEGORY_UNSPECIFIED)


# The names a person types for a device kind (agent pairing, the nudge catalog).
DEVICE_KINDS: Final[dict[str, int]] = {
    "phone": common_pb2.DEVICE_KIND_PHONE,
    "desktop": common_pb2.DEVICE_KIND_DESKTOP,
    "wearable": common_pb2.DEVICE_KIND_WEARABLE_BRIDGE,
}
DEVICE_KIND_NAMES: Final[dict[int, str]] = {v: k for k, v in DEVICE_KINDS.items()}

# Every consent category a person can grant, in the API's order.
CONSENT_CATEGORIES: Final = tuple(
    v for v in common_pb2.ConsentCategory.values() if v != common_pb2.CONSENT_CATEGORY_UNSPECIFIED
)
_CATEGORY_PREFIX: Final = "CONSENT_CATEGORY_"


def category_name(category: int) -> str:
    """ "behavior", "activity", ... for a ConsentCategory value."""
    name = common_pb2.ConsentCategory.Name(category)  # type: ignore[arg-type]
    return name.removeprefix(_CATEGORY_PREFIX).lower()


def parse_category(text: str) -> int | None:
    """A ConsentCategory from "behavior", "ACTIVITY" or "CONSENT_CATEGORY_SYNC"; None if unknown."""
    name = _CATEGORY_PREFIX + text.strip().upper().removeprefix(_CATEGORY_PREFIX)
    for category in CONSENT_CATEGORIES:
        if common_pb2.ConsentCategory.Name(category) == name:
            return category
    return None
