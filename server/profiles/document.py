"""The profile document on the server: the shared kernel's `pulsesync.profile_document`, with its
refusals raised as the server's errors (InvalidArgument or PermissionDenied, same reason)."""

from __future__ import annotations

from collections.abc import Iterable

from pulsesync import profile_document as _doc
from pulsesync.profile_document import (
    APP_SETTING as APP_SETTING,
)
from pulsesync.profile_document import (
    CONTINUITY as CONTINUITY,
)
from pulsesync.profile_document import (
    MAX_KEY_CHARS as MAX_KEY_CHARS,
)
from pulsesync.profile_document import (
    MAX_LIST_ITEMS as MAX_LIST_ITEMS,
)
from pulsesync.profile_document import (
    MAX_PATHS as MAX_PATHS,
)
from pulsesync.profile_document import (
    MAX_SETTING_CHARS as MAX_SETTING_CHARS,
)
from pulsesync.profile_document import (
    MAX_TEXT_CHARS as MAX_TEXT_CHARS,
)
from pulsesync.profile_document import (
    MAX_TEXT_SCALE as MAX_TEXT_SCALE,
)
from pulsesync.profile_document import (
    MINUTES_PER_DAY as MINUTES_PER_DAY,
)
from pulsesync.profile_document import (
    MUTED as MUTED,
)
from pulsesync.profile_document import (
    PINNED_ORDER as PINNED_ORDER,
)
from pulsesync.profile_document import (
    QUIET_HOURS as QUIET_HOURS,
)
from pulsesync.profile_document import (
    SCALAR_PATHS as SCALAR_PATHS,
)
from pulsesync.profile_document import (
    SERVER_NODE as SERVER_NODE,
)
from pulsesync.profile_document import (
    SERVER_ONLY_PATHS as SERVER_ONLY_PATHS,
)
from pulsesync.profile_document import (
    USAGE_RANKING as USAGE_RANKING,
)
from pulsesync.profile_document import (  # re-exported: the server's name for the document
    DocumentError as DocumentError,
)
from pulsesync.profile_document import (
    Entry as Entry,
)
from pulsesync.profile_document import (
    State as State,
)
from pulsesync.profile_document import (
    apply as apply,
)
from pulsesync.profile_document import (
    build as build,
)
from pulsesync.profile_document import (
    continuity_path as continuity_path,
)
from pulsesync.profile_document import (
    diff as diff,
)
from pulsesync.profile_document import (
    fields_of as fields_of,
)
from pulsesync.profile_document import (
    is_known_path as is_known_path,
)
from pulsesync.profile_document import (
    key_part as key_part,
)
from pulsesync.profile_document import (
    merge as merge,
)
from pulsesync.profile_document import (
    state_of as state_of,
)
from pulsesync.server.errors import InvalidArgument, PermissionDenied, PulseSyncError
from pulsesync.v1 import profiles_pb2


def _server_error(e: DocumentError) -> PulseSyncError:
    cls = PermissionDenied if e.denied else InvalidArgument
    return cls(e.message, reason=e.reason)


def validate(profile: profiles_pb2.Profile, paths: Iterable[str]) -> None:
    """`pulsesync.profile_document.validate`, refusing with InvalidArgument."""
    try:
        _doc.validate(profile, paths)
    except DocumentError as e:
        raise _server_error(e) from None


def delta_of(
    profile: profiles_pb2.Profile,
    edits: Iterable[profiles_pb2.ProfileEdit],
    *,
    node_id: str,
    max_wall_ms: int | None = None,
) -> State:
    """`pulsesync.profile_document.delta_of`, refusing with InvalidArgument or PermissionDenied."""
    try:
        return _doc.delta_of(profile, edits, node_id=node_id, max_wall_ms=max_wall_ms)
    except DocumentError as e:
        raise _server_error(e) from None
