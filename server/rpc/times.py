"""Timestamps taken from requests, checked once for every handler.

A `google.protobuf.Timestamp` on the wire can hold any int64 seconds and int32 nanos; the
server keeps times as integer microseconds in SQLite INTEGER columns (int64). The valid range
of a Timestamp (years 0001 to 9999, nanos 0..999,999,999, as its definition says) fits in int64
microseconds with room to spare, so checking it here means no query or row ever overflows.
"""

from __future__ import annotations

from typing import Final

from google.protobuf import timestamp_pb2

from pulsesync.server.errors import InvalidArgument

# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range google.protobuf.Timestamp defines.
MIN_SECONDS: Final = -62_135_596_800
MAX_SECONDS: Final = 253_402_300_799


def timestamp_us(t: timestamp_pb2.Timestamp, field: str) -> int:
    """Integer microseconds of a request's Timestamp field, or INVALID_ARGUMENT
    (`INVALID_TIMESTAMP`) when it is outside what a Timestamp may hold."""
    if not MIN_SECONDS <= t.seconds <= MAX_SECONDS or not 0 <= t.nanos <= 999_999_999:
        raise InvalidArgument(
            f"{field} is not a valid timestamp (seconds must be within years 0001..9999 and "
            "nanos within 0..999999999)",
            reason="INVALID_TIMESTAMP",
            metadata={"field": field},
        )
    return t.seconds * 1_000_000 + t.nanos // 1000
