"""The profile document as a map of field paths to stamped values, and the merge on it.

A profile is split into *paths*, the unit of last-writer-wins (see profiles.proto for the
grammar). Each path holds an `Entry`: its HLC stamp and its value, or no value for a
tombstone (a cleared field or removed item). A value is the deterministic serialization of a
`Profile` that contains only that field, so the document is rebuilt by protobuf's own merge
of the fragments, and two values compare byte for byte.

`merge` takes, path by path, the entry with the greater (stamp, value) -- a join on a
semilattice, hence commutative, associative and idempotent: replicas that have seen the same
edits hold the same document whatever order the edits arrived in.
"""

from __future__ import annotations

import math
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from google.protobuf.message import Message

from pulsesync.hlc import Stamp
from pulsesync.v1 import profiles_pb2


class DocumentError(ValueError):
    """An edit or value the document refuses: `reason` is the ErrorInfo reason the server sends
    (INVALID_ARGUMENT, or PERMISSION_DENIED when `denied`); the agent refuses it before queueing."""

    def __init__(self, message: str, *, reason: str, denied: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.denied = denied


# Scalar leaves: "a.b" names field b of submessage a. A default value means "not set".
SCALAR_PATHS: Final = (
    "preferences.theme",
    "preferences.language",
    "preferences.units",
    "preferences.text_scale",
    "goals.daily_steps",
    "goals.daily_study_minutes",
    "goals.daily_active_minutes",
    "time_zone",
)
# Leaves that are a whole message or list, merged as one value.
QUIET_HOURS: Final = "quiet_hours"
PINNED_ORDER: Final = "layout.pinned_order"
USAGE_RANKING: Final = "layout.usage_ranking"
# Keyed leaves: one path per map key, set element or item.
APP_SETTING: Final = "preferences.app_settings/"
MUTED: Final = "muted_nudge_types/"
CONTINUITY: Final = "continuity_items/"

SERVER_NODE: Final = "server"
# Devices may not write what the server maintains.
SERVER_ONLY_PATHS: Final = frozenset({USAGE_RANKING})

# Bounds that keep one person's document (and its tombstones) a reasonable size.
MAX_PATHS: Final = 5_000
MAX_KEY_CHARS: Final = 200
MAX_TEXT_CHARS: Final = 1_000
# Settings values may carry an app's small JSON blob; 64 KiB each is plenty.
MAX_SETTING_CHARS: Final = 64 * 1024
MAX_LIST_ITEMS: Final = 200
MINUTES_PER_DAY: Final = 24 * 60
MAX_TEXT_SCALE: Final = 4.0


@dataclass(frozen=True, slots=True)
class Entry:
    """A path's stamp and value (None: a tombstone)."""

    stamp: Stamp
    value: bytes | None

    def sort_key(self) -> tuple[Stamp, int, bytes]:
        """LWW order: stamp, then a value beats a tombstone, then bytes (a total order)."""
        return (self.stamp, 0 if self.value is None else 1, self.value or b"")


State = dict[str, Entry]


def key_part(key: str) -> str:
    """Percent-encode one key for use inside a path."""
    return quote(key, safe="")


def continuity_path(app: str, item_id: str) -> str:
    """The path of one continuity item."""
    return f"{CONTINUITY}{key_part(app)}/{key_part(item_id)}"


def _frag(msg: profiles_pb2.Profile) -> bytes:
    return msg.SerializeToString(deterministic=True)


def _scalar_fragment(profile: profiles_pb2.Profile, path: str) -> bytes | None:
    head, _, leaf = path.rpartition(".")
    src: Message = getattr(profile, head) if head else profile
    value = getattr(src, leaf)
    if not value:
        return None
    out = profiles_pb2.Profile()
    dst: Message = getattr(out, head) if head else out
    setattr(dst, leaf, value)
    return _frag(out)


def fields_of(profile: profiles_pb2.Profile) -> dict[str, bytes]:
    """Every set leaf of a profile, as path -> value fragment (derived fields excluded)."""
    out: dict[str, bytes] = {}
    for path in SCALAR_PATHS:
        frag = _scalar_fragment(profile, path)
        if frag is not None:
            out[path] = frag
    if profile.HasField("quiet_hours"):
        out[QUIET_HOURS] = _frag(profiles_pb2.Profile(quiet_hours=profile.quiet_hours))
    if profile.layout.pinned_order:
        out[PINNED_ORDER] = _frag(
            profiles_pb2.Profile(
                layout=profiles_pb2.Layout(pinned_order=profile.layout.pinned_order)
            )
        )
    if profile.layout.usage_ranking:
        out[USAGE_RANKING] = _frag(
            profiles_pb2.Profile(
                layout=profiles_pb2.Layout(usage_ranking=profile.layout.usage_ranking)
            )
        )
    for key, value in profile.preferences.app_settings.items():
        out[APP_SETTING + key_part(key)] = _frag(
            profiles_pb2.Profile(preferences=profiles_pb2.Preferences(app_settings={key: value}))
        )
    for kind in profile.muted_nudge_types:
        out[MUTED + key_part(kind)] = _frag(profiles_pb2.Profile(muted_nudge_types=[kind]))
    for item in profile.continuity_items:
        out[continuity_path(item.app, item.item_id)] = _frag(
            profiles_pb2.Profile(continuity_items=[item])
        )
    return out


def is_known_path(path: str) -> bool:
    """Whether path names a leaf of the document."""
    if path in SCALAR_PATHS or path in (QUIET_HOURS, PINNED_ORDER, USAGE_RANKING):
        return True
    for prefix in (APP_SETTING, MUTED):
        if path.startswith(prefix):
            key = path[len(prefix) :]
            return bool(key) and "/" not in key
    if path.startswith(CONTINUITY):
        parts = path[len(CONTINUITY) :].split("/")
        return len(parts) == 2 and all(parts)
    return False


def build(state: Mapping[str, Entry]) -> profiles_pb2.Profile:
    """The document a state stands for (values, stamps and the derived feature order)."""
    profile = profiles_pb2.Profile()
    profile.MergeFromString(
        b"".join(e.value for _, e in sorted(state.items()) if e.value is not None)
    )
    items = sorted(
        profile.continuity_items,
        key=lambda i: (-i.update_time.seconds, -i.update_time.nanos, i.app, i.item_id),
    )
    del profile.continuity_items[:]
    profile.continuity_items.extend(items)
    layout = profile.layout
    layout.feature_order[:] = list(layout.pinned_order or layout.usage_ranking)
    for path, entry in state.items():
        profile.field_stamps[path].CopyFrom(entry.stamp.to_proto())
    return profile


def state_of(profile: profiles_pb2.Profile) -> State:
    """The stamped state carried by a profile (paths without a stamp are not part of it)."""
    values = fields_of(profile)
    return {
        path: Entry(Stamp.from_proto(stamp), values.get(path))
        for path, stamp in profile.field_stamps.items()
    }


def merge(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> State:
    """The join of two states: per path, the greater entry."""
    out = dict(a)
    for path, entry in b.items():
        mine = out.get(path)
        if mine is None or entry.sort_key() > mine.sort_key():
            out[path] = entry
    return out


def apply(state: Mapping[str, Entry], delta: Mapping[str, Entry]) -> tuple[State, list[str]]:
    """Merge delta into state; also the delta paths whose entry lost (sorted)."""
    merged = merge(state, delta)
    lost = sorted(path for path, entry in delta.items() if merged[path] != entry)
    return merged, lost


def diff(before: Mapping[str, Entry], after: Mapping[str, bytes | None]) -> Iterator[str]:
    """Paths whose value differs between a state and a path -> value map."""
    for path in sorted(set(before) | set(after)):
        old = before.get(path)
        if (old.value if old else None) != after.get(path):
            yield path


# -- validation of device edits ------------------------------------------------------------
def _text(what: str, value: str, limit: int = MAX_TEXT_CHARS) -> None:
    if len(value) > limit:
        raise DocumentError(
            f"{what} is {len(value)} characters; at most {limit} are accepted",
            reason="PROFILE_VALUE_TOO_LONG",
        )


def validate(profile: profiles_pb2.Profile, paths: Iterable[str]) -> None:
    """Refuse values that no app could use (InvalidArgument saying which and why)."""
    wanted = set(paths)
    prefs = profile.preferences
    _text("preferences.theme", prefs.theme)
    _text("preferences.language", prefs.language)
    scale = prefs.text_scale
    if "preferences.text_scale" in wanted and (
        not math.isfinite(scale) or not 0 <= scale <= MAX_TEXT_SCALE
    ):
        raise DocumentError(
            f"preferences.text_scale must be between 0 and {MAX_TEXT_SCALE}, got {scale}",
            reason="INVALID_PROFILE_VALUE",
        )
    if "preferences.units" in wanted and prefs.units not in profiles_pb2.Units.values():
        raise DocumentError(
            f"preferences.units {prefs.units} is not a known Units value",
            reason="INVALID_PROFILE_VALUE",
        )
    if QUIET_HOURS in wanted:
        qh = profile.quiet_hours
        if qh.start_minute >= MINUTES_PER_DAY or qh.end_minute >= MINUTES_PER_DAY:
            raise DocumentError(
                "quiet_hours start_minute and end_minute are minutes after local midnight, "
                f"0..{MINUTES_PER_DAY - 1}; got {qh.start_minute}..{qh.end_minute}",
                reason="INVALID_PROFILE_VALUE",
            )
    if "time_zone" in wanted and profile.time_zone:
        try:
            zoneinfo.ZoneInfo(profile.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise DocumentError(
                f"time_zone {profile.time_zone!r} is not an IANA time zone name "
                "(e.g. 'Europe/Paris', 'America/New_York', 'UTC')",
                reason="INVALID_TIME_ZONE",
            ) from None
    for key, value in prefs.app_settings.items():
        _text("a preferences.app_settings key", key, MAX_KEY_CHARS)
        _text(f"preferences.app_settings[{key!r}]", value, MAX_SETTING_CHARS)
    for kind in profile.muted_nudge_types:
        _text("a muted nudge type", kind, MAX_KEY_CHARS)
    pinned = list(profile.layout.pinned_order)
    if len(pinned) > MAX_LIST_ITEMS or len(set(pinned)) != len(pinned):
        raise DocumentError(
            f"layout.pinned_order must list distinct features, at most {MAX_LIST_ITEMS}",
            reason="INVALID_PROFILE_VALUE",
        )
    for item in profile.continuity_items:
        if not item.app or not item.item_id:
            raise DocumentError(
                "a continuity item needs both app and item_id", reason="INVALID_PROFILE_VALUE"
            )
        _text("continuity item app", item.app, MAX_KEY_CHARS)
        _text("continuity item item_id", item.item_id, MAX_KEY_CHARS)
        _text("continuity item title", item.title)
        _text("continuity item position", item.position)
        if not (math.isfinite(item.progress) and 0 <= item.progress <= 1):
            raise DocumentError(
                f"continuity item progress must be between 0 and 1, got {item.progress}",
                reason="INVALID_PROFILE_VALUE",
            )


def delta_of(
    profile: profiles_pb2.Profile,
    edits: Iterable[profiles_pb2.ProfileEdit],
    *,
    node_id: str,
    max_wall_ms: int | None = None,
) -> State:
    """The state change a device's edits stand for, checked path by path."""
    edits = list(edits)
    validate(profile, (e.field_path for e in edits))
    values = fields_of(profile)
    delta: State = {}
    for edit in edits:
        path = edit.field_path
        if not is_known_path(path):
            raise DocumentError(
                f"unknown field path {path!r}; see ProfileEdit in profiles.proto for the paths",
                reason="UNKNOWN_FIELD_PATH",
            )
        if path in SERVER_ONLY_PATHS and node_id != SERVER_NODE:
            raise DocumentError(
                f"{path} is maintained by the server; set layout.pinned_order to choose "
                "your own order",
                reason="SERVER_MAINTAINED_FIELD",
                denied=True,
            )
        if path in delta:
            raise DocumentError(
                f"field path {path!r} is edited twice in one request; send the latest edit only",
                reason="DUPLICATE_FIELD_PATH",
            )
        if not edit.HasField("stamp"):
            raise DocumentError(f"the edit of {path!r} has no stamp", reason="MISSING_STAMP")
        stamp = Stamp.from_proto(edit.stamp)
        if stamp.node_id != node_id:
            raise DocumentError(
                f"the edit of {path!r} is stamped by node {stamp.node_id!r}, but this device is "
                f"{node_id!r}: stamp edits with the device's own id",
                reason="STAMP_NODE_MISMATCH",
            )
        if max_wall_ms is not None and stamp.wall_time_ms > max_wall_ms:
            raise DocumentError(
                f"the edit of {path!r} is stamped {stamp.wall_time_ms - max_wall_ms} ms further "
                "in the future than the server accepts: set the device's clock",
                reason="STAMP_IN_FUTURE",
            )
        value = None if edit.delete else values.get(path)
        keyed = path.startswith((APP_SETTING, MUTED, CONTINUITY))
        if keyed and value is None and not edit.delete:
            raise DocumentError(
                f"the edit of {path!r} has no value in the request's profile; send the value, "
                "or set delete=true to remove it",
                reason="MISSING_VALUE",
            )
        delta[path] = Entry(stamp, value)
    return delta
