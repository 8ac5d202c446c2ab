"""The device's view of the person's consents: live from the server, kept on disk, default deny.

`SyncedConsent` is the `ConsentView` the Tracker asks before recording anything. It answers
from memory (a frozenset lookup, safe from any thread), is kept current by the
`PrivacyService.WatchConsents` stream (the current state first, then every change made on any
of the person's devices), and saves each state in the agent's state directory so that an
agent started offline keeps honouring the last known choice. With nothing known -- never
synced, an unreadable file, the device revoked or the person erased -- nothing is allowed.

A withdrawal takes effect in memory before it is written to disk, so collection stops the
moment the change arrives.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import grpc

from pulsesync.edge_agent.calls import mutate
from pulsesync.edge_agent.client import Credentials
from pulsesync.edge_agent.config import AgentSettings
from pulsesync.edge_agent.errors import AgentError, PairingRequired, translate_rpc
from pulsesync.edge_agent.retry import Backoff
from pulsesync.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc

log = logging.getLogger(__name__)

CONSENT_FILE: Final = "consents.json"
# A watch stream is a long call; it still carries a deadline (as every call does) and is
# simply reopened when it expires. An hour keeps reconnects rare and idle cost nil.
WATCH_DEADLINE_S: Final = 3600.0
_FORMAT: Final = "pulsesync-consents-v1"

Listener = Callable[[frozenset[int]], None]


class SyncedConsent:
    """A ConsentView backed by WatchConsents and persisted in the agent's state directory."""

    def __init__(
        self,
        state_dir: str | Path,
        credentials: Credentials | None = None,
        *,
        settings: AgentSettings | None = None,
        on_change: Listener | None = None,
    ) -> None:
        self.path = Path(state_dir) / CONSENT_FILE
        self.credentials = credentials
        self.settings = settings or AgentSettings()
        self._on_change = on_change
        self._granted: frozenset[int] = self._load()

    # -- ConsentView ------------------------------------------------------------------------
    def allows(self, category: int) -> bool:
        """Whether the person has granted this category (default deny)."""
        return category in self._granted

    @property
    def granted(self) -> frozenset[int]:
        """The categories granted now."""
        return self._granted

    # -- state ------------------------------------------------------------------------------
    def _load(self) -> frozenset[int]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError) as e:
            log.warning("unreadable consent file; collecting nothing until synced: %s", e)
            return frozenset()
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            log.warning("unknown consent file format; collecting nothing until synced")
            return frozenset()
        names = data.get("granted", [])
        known = set(common_pb2.ConsentCategory.keys())
        return frozenset(
            common_pb2.ConsentCategory.Value(n)
            for n in names
            if isinstance(n, str) and n in known and n != "CONSENT_CATEGORY_UNSPECIFIED"
        )

    def _save(self, granted: frozenset[int]) -> None:
        data = {
            "format": _FORMAT,
            "granted": sorted(common_pb2.ConsentCategory.Name(c) for c in granted),  # type: ignore[arg-type]
        }
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def apply(self, consents: Iterable[privacy_pb2.Consent]) -> bool:
        """Adopt the server's consent state; returns whether anything changed."""
        return self._set(frozenset(c.category for c in consents if c.granted))

    def deny_all(self) -> bool:
        """Forget every grant (the device was revoked or the person erased)."""
        return self._set(frozenset())

    def _set(self, granted: frozenset[int]) -> bool:
        if granted == self._granted:
            return False
        self._granted = granted  # first in memory: a withdrawal stops collection at once
        try:
            self._save(granted)
        except OSError:
            log.exception("cannot save consents; they apply until the agent restarts")
        if self._on_change is not None:
            self._on_change(granted)
        return True

    # -- network ----------------------------------------------------------------------------
    def _require_credentials(self) -> Credentials:
        if self.credentials is None:
            raise AgentError("consent sync needs credentials: pair the device first")
        return self.credentials

    async def update(
        self, category: int, granted: bool, policy_version: str = ""
    ) -> privacy_pb2.Consent:
        """Grant or withdraw a category from this device (the person's choice in the app)."""
        creds = self._require_credentials()
        rotation = creds.rotation()

        async def invoke(
            req: privacy_pb2.UpdateConsentRequest,
        ) -> privacy_pb2.UpdateConsentResponse:
            async with creds.channel(rotation.current) as channel:
                stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
                return await stub.UpdateConsent(
                    req, metadata=creds.metadata, timeout=self.settings.call_timeout_s
                )

        # One request_id for this choice, reused if the answer is lost (calls.mutate).
        resp = await mutate(
            invoke,
            privacy_pb2.UpdateConsentRequest(
                category=category,  # type: ignore[arg-type]
                granted=granted,
                policy_version=policy_version,
            ),
            what="consent update",
            on_retry=lambda _: rotation.advance(),
        )
        if resp.consent.granted:
            self._set(self._granted | {resp.consent.category})
        else:
            self._set(self._granted - {resp.consent.category})
        return resp.consent

    async def run(self, *, backoff: Backoff | None = None) -> None:
        """Follow WatchConsents until cancelled, reconnecting with full-jitter backoff.

        Raises PairingRequired (after denying everything) when the server no longer accepts
        the token, and AgentError when the server lacks the API.
        """
        creds = self._require_credentials()
        backoff = backoff or Backoff(self.settings.backoff_base_s, self.settings.backoff_cap_s)
        rotation = creds.rotation()
        while True:
            try:
                async with creds.channel(rotation.current) as channel:
                    stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
                    call = stub.WatchConsents(
                        privacy_pb2.WatchConsentsRequest(),
                        metadata=creds.metadata,
                        timeout=WATCH_DEADLINE_S,
                    )
                    async for resp in call:
                        self.apply(resp.consents)
                        backoff.reset()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the watch's own deadline: reopen at once
                err = translate_rpc(e, server=creds.server, what="consent sync")
                if isinstance(err, PairingRequired):
                    self.deny_all()
                if isinstance(err, AgentError):
                    raise err from e
                log.info("consent watch failed (%s); retrying", code.name)
                rotation.advance()  # another replica, if there are several
            await backoff.wait()
