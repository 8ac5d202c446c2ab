"""The privacy operations behind both the PrivacyService RPCs and the `pulsesync privacy` CLI.

One code path for both: a person acting through a device and an operator acting through the
CLI get the same summary, the same archive and the same erasure; only the audit actor differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pulsesync.server.clock import Clock
from pulsesync.server.errors import NotFound
from pulsesync.server.identity import IdentityStore
from pulsesync.server.privacy.audit import Action, Actor, AuditLog
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.erasure import DeletionReceipt, Eraser
from pulsesync.server.privacy.export import MANIFEST, export_user
from pulsesync.server.privacy.keys import ReceiptKey
from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.privacy.retention import RetentionPolicy, purge_expired
from pulsesync.server.privacy.summary import PrivacySummary, summarize
from pulsesync.server.sessions import SessionRegistry
from pulsesync.server.storage.privacy import PrivacyStorage, ScrubReport


@dataclass(frozen=True, slots=True)
class Person:
    user_id: int
    name: str
    pseudonym: str


class PrivacyCenter:
    """Summary, export, erasure and retention (see the module docstring)."""

    def __init__(
        self,
        storage: PrivacyStorage,
        *,
        clock: Clock,
        identity: IdentityStore,
        consent: ConsentStore,
        sessions: SessionRegistry,
        hooks: UserDataRegistry,
        policy: RetentionPolicy,
        key: ReceiptKey,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.identity = identity
        self.consent = consent
        self.hooks = hooks
        self.policy = policy
        self.key = key
        self.audit = AuditLog(storage, clock)
        self._eraser = Eraser(
            storage,
            key,
            self.audit,
            hooks,
            clock=clock,
            identity=identity,
            consent=consent,
            sessions=sessions,
        )

    async def person(self, user_id: int) -> Person:
        """The person behind user_id (NotFound once erased)."""
        row = await self.storage.person(user_id)
        if row is None:
            raise NotFound("no such user (erased?)", reason="USER_NOT_FOUND")
        return Person(user_id, row.name, self.key.pseudonym(user_id, row.create_us))

    async def summary(self, user_id: int, actor: Actor) -> PrivacySummary:
        """What is held about the person; an operator's read is audited."""
        person = await self.person(user_id)
        result = await summarize(
            self.storage,
            user_id,
            person.name,
            await self.consent.states(user_id),
            self.policy.raw_event_us,
        )
        if actor is not Actor.DEVICE:
            await self.audit.record(Action.SUMMARY, actor, person.pseudonym)
        return result

    async def export(self, user_id: int, actor: Actor) -> AsyncIterator[tuple[str, bytes]]:
        """Stream the person's archive; audited once it is complete, with its counts."""
        person = await self.person(user_id)
        total = 0
        files: dict[str, int] = {}
        async for name, chunk in export_user(
            self.storage, self.hooks, user_id, self.clock.now_us()
        ):
            total += len(chunk)
            if name != MANIFEST:
                files.setdefault(name.removesuffix(".jsonl"), 0)
                files[name.removesuffix(".jsonl")] += chunk.count(b"\n")
            yield name, chunk
        await self.audit.record(
            Action.EXPORT, actor, person.pseudonym, {"bytes": total, "records": files}
        )

    async def erase(
        self, user_id: int, actor: Actor, *, scrub: bool = True
    ) -> tuple[DeletionReceipt, ScrubReport | None]:
        """Erase the person (see `pulsesync.server.privacy.erasure`)."""
        return await self._eraser.erase(user_id, actor, scrub=scrub)

    async def purge_expired(self) -> dict[str, int]:
        """Apply the retention policy once; audited when anything was deleted."""
        deleted = await purge_expired(self.storage, self.clock.now_us(), self.policy)
        if any(deleted.values()):
            await self.audit.record(
                Action.RETENTION,
                Actor.SYSTEM,
                "",
                {"deleted": deleted, "retention_days": self.policy.raw_event_days},
            )
        return deleted
