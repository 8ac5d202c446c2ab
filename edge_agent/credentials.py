"""Rotating the device token before it ages out.

A server may refuse tokens older than an operator-set maximum age (TOKEN_EXPIRED), and a
token that leaked should not work forever. The agent therefore trades its token for a new one
(DeviceService.RotateDeviceToken) when it starts and the token is older than ROTATE_EVERY_S.
The new token is written to the credentials file (atomically, mode 0600) before anything uses
it; the old one stays valid on the server for a short grace period, so a crash between the
call and the write is recovered by rotating again with the old token on the next start.
The call carries a request_id and is retried with it (calls.mutate), so a lost answer is
recovered at once: the retry gets the same new token instead of a second rotation.

When the token was issued is kept beside the credentials file (`<file>.rotated`); a file
without it counts from the credentials file's modification time (when it was paired).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Final

import grpc

from pulsesync.edge_agent.calls import mutate
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.config import DEFAULT_CALL_TIMEOUT_S
from pulsesync.timeutil import US_PER_S
from pulsesync.v1 import devices_pb2, devices_pb2_grpc

log = logging.getLogger(__name__)

# A week: far below any sensible maximum age (an operator would set 30 or 90 days), so an
# agent that starts now and then rotates long before its token is refused.
ROTATE_EVERY_S: Final = 7 * 86_400
# Failures that say nothing about the token: keep it and try again at the next start.
_TRY_LATER: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def stamp_path(credentials_path: Path) -> Path:
    """Where the issue time of the token in credentials_path is kept."""
    return credentials_path.with_name(credentials_path.name + ".rotated")


def token_issue_us(credentials_path: Path) -> int:
    """When the saved token was issued (microseconds since the epoch)."""
    try:
        return int(json.loads(stamp_path(credentials_path).read_text("utf-8"))["issue_us"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return credentials_path.stat().st_mtime_ns // 1000


# Few: rotation runs while the agent starts, and an unreachable server only defers it.
ROTATE_ATTEMPTS: Final = 3


async def rotate(
    creds: Credentials,
    path: Path,
    *,
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    max_attempts: int = ROTATE_ATTEMPTS,
) -> Credentials:
    """Trade the token for a new one and save it to path; the new credentials."""
    rotation = creds.rotation()

    async def invoke(
        req: devices_pb2.RotateDeviceTokenRequest,
    ) -> devices_pb2.RotateDeviceTokenResponse:
        async with creds.channel(rotation.current) as channel:
            stub = devices_pb2_grpc.DeviceServiceStub(channel)
            return await stub.RotateDeviceToken(req, metadata=creds.metadata, timeout=timeout_s)

    resp = await mutate(
        invoke,
        devices_pb2.RotateDeviceTokenRequest(),
        what="token rotation",
        max_attempts=max_attempts,
        on_retry=lambda _: rotation.advance(),
    )
    new = dataclasses.replace(creds, token=resp.token)
    new.save(path)
    stamp = stamp_path(path)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"issue_us": resp.issue_time.ToMicroseconds()}), "utf-8")
    os.replace(tmp, stamp)
    log.info("device token rotated")
    return new


async def rotate_if_due(
    creds: Credentials, path: Path, *, now_us: int, every_s: float = ROTATE_EVERY_S
) -> Credentials:
    """The credentials to use: rotated first when the token is older than every_s.

    An unreachable server leaves the token as it is (rotation is tried at the next start);
    a refused token is left for the uplink to report (PairingRequired).
    """
    if now_us - token_issue_us(path) < every_s * US_PER_S:
        return creds
    try:
        return await rotate(creds, path)
    except grpc.aio.AioRpcError as e:
        if e.code() in _TRY_LATER:
            log.warning("could not rotate the device token (%s); trying at next start", e.code())
        else:
            log.error("the server refused to rotate the device token: %s", e.details())
        return creds
