"""Waking an app that is not open: the push-provider seam and its webhook implementation.

The server never talks to FCM or APNs itself: it POSTs each nudge for a device without an
open stream to the operator's own push gateway, which holds those credentials and wakes the
app; the app then calls FetchPendingNudges. An FCM or APNs adapter implements the same
`PushProvider` Protocol.

Webhook request: POST <url>, `Content-Type: application/json`, body

    {"push_token": ..., "device_id": ..., "nudge_id": ..., "nudge_type": ..., "title": ...,
     "message": ..., "expire_time": RFC 3339, "data": {...}}

with `X-PulseSync-Timestamp: <unix seconds>` and `X-PulseSync-Signature: sha256=<hex>`, the
HMAC-SHA256 under the shared secret of `<timestamp>.<body>`, so the gateway can refuse forged
and replayed calls. A 2xx answer is a delivery; 4xx (but 408/429) is final; anything else is
retried a bounded number of times.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Final, Protocol

from pulsesync.server.config import NudgeConfig
from pulsesync.v1 import nudges_pb2

log = logging.getLogger(__name__)

# A gateway that does not answer in 5 s is down: the nudge waits for the app to fetch it.
TIMEOUT_S: Final = 5.0
# Three tries with 0.5 s and 1 s between them: a gateway restart is ridden out, a nudge
# (valid for tens of minutes) is not held up by a long outage.
ATTEMPTS: Final = 3
BACKOFF_S: Final = 0.5
ENV_URL: Final = "PULSESYNC_PUSH_WEBHOOK_URL"
ENV_SECRET: Final = "PULSESYNC_PUSH_WEBHOOK_SECRET"


class PushProvider(Protocol):
    """Wakes a device's app with a nudge; True when the provider accepted it."""

    async def push(self, push_token: str, nudge: nudges_pb2.Nudge) -> bool: ...


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value for a webhook body sent at timestamp."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


@dataclass(slots=True)
class WebhookPushProvider:
    """POSTs nudges as signed JSON to the operator's push gateway."""

    url: str
    secret: bytes
    timeout_s: float = TIMEOUT_S
    attempts: int = ATTEMPTS
    backoff_s: float = BACKOFF_S

    def body(self, push_token: str, nudge: nudges_pb2.Nudge) -> bytes:
        """The JSON body for one nudge."""
        return json.dumps(
            {
                "push_token": push_token,
                "device_id": nudge.device_id,
                "nudge_id": nudge.nudge_id,
                "nudge_type": nudge.nudge_type,
                "title": nudge.title,
                "message": nudge.message,
                "expire_time": nudge.expire_time.ToJsonString(),
                "data": dict(nudge.data),
            },
            separators=(",", ":"),
        ).encode()

    def _post(self, body: bytes) -> int:
        stamp = str(int(time.time()))
        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-PulseSync-Timestamp": stamp,
                "X-PulseSync-Signature": sign(self.secret, stamp, body),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    async def push(self, push_token: str, nudge: nudges_pb2.Nudge) -> bool:
        body = self.body(push_token, nudge)
        for attempt in range(self.attempts):
            try:
                status = await asyncio.to_thread(self._post, body)
            except (OSError, urllib.error.URLError) as e:
                status, why = 0, str(e)
            else:
                why = f"HTTP {status}"
            if 200 <= status < 300:
                return True
            if 400 <= status < 500 and status not in (408, 429):
                log.warning("push gateway refused a nudge", extra={"status": status})
                return False
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        log.warning("push gateway unreachable; the nudge waits to be fetched", extra={"why": why})
        return False


def push_provider(config: NudgeConfig) -> PushProvider | None:
    """The webhook provider of config.push_url and push_secret (PULSESYNC_PUSH_WEBHOOK_URL and
    _SECRET through `load_config`); None when no URL is set."""
    if not config.push_url:
        return None
    if len(config.push_secret) < 16:
        raise ValueError(
            f"the push webhook needs a shared secret of at least 16 characters ({ENV_SECRET})"
        )
    return WebhookPushProvider(config.push_url, config.push_secret.encode())
