"""Erasure: delete every row of a person, destroy their keys, and leave no bytes behind.

Order matters:
1. close the person's open streams and drop cached identities, so nothing in flight commits
   after the delete;
2. in one transaction (with `secure_delete`, which overwrites freed content with zeros),
   delete their rows from every table with a `user_id` column, then the user row, and record
   a deletion receipt and an audit entry;
3. close streams again (a call authenticated in between), run the components' erase hooks
   (the profile component destroys the person's data key: crypto-shredding), and sweep the
   tables once more for rows committed by a request that was already past authentication;
4. `VACUUM` and `wal_checkpoint(TRUNCATE)`, so that neither the database file nor its
   write-ahead log holds a page with the person's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Final

from pulsesync.server.clock import Clock
from pulsesync.server.errors import NotFound, Unauthenticated
from pulsesync.server.identity import IdentityStore
from pulsesync.server.privacy.audit import Action, Actor, AuditLog
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.keys import ReceiptKey
from pulsesync.server.privacy.registry import UserDataRegistry
from pulsesync.server.sessions import SessionRegistry
from pulsesync.server.storage.privacy import AuditRow, PrivacyStorage, ReceiptRow, ScrubReport

log = logging.getLogger(__name__)

ERASE_CONFIRMATION: Final = "ERASE"
RECEIPT_VERSION: Final = 1
_SALT_BYTES: Final = 16  # 128-bit salt: a subject hash cannot be looked up in a table.


@dataclass(frozen=True, slots=True)
class DeletionReceipt:
    """Proof of an erasure that names the person only through a salted hash."""

    receipt_id: str
    erase_us: int
    deleted_counts: dict[str, int]
    subject_salt: str
    subject_hash: str
    signature: str = ""

    def canonical(self) -> bytes:
        """The signed form: compact JSON with sorted keys, signature excluded."""
        body = {
            "v": RECEIPT_VERSION,
            "receipt_id": self.receipt_id,
            "erase_us": self.erase_us,
            "deleted_counts": dict(sorted(self.deleted_counts.items())),
            "subject_salt": self.subject_salt,
            "subject_hash": self.subject_hash,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def subject_hash(salt_hex: str, user_name: str) -> str:
    """SHA-256(salt || UTF-8 user name), hex: lets the person show a receipt is theirs."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + user_name.encode("utf-8")).hexdigest()


def verify_receipt(key: ReceiptKey, receipt: DeletionReceipt) -> bool:
    """Whether the receipt was signed by this server's receipt key and is unchanged."""
    return key.verify(receipt.canonical(), receipt.signature)


class Eraser:
    """Erases one person at a time."""

    def __init__(
        self,
        storage: PrivacyStorage,
        key: ReceiptKey,
        audit: AuditLog,
        hooks: UserDataRegistry,
        *,
        clock: Clock,
        identity: IdentityStore,
        consent: ConsentStore,
        sessions: SessionRegistry,
    ) -> None:
        self._storage = storage
        self._key = key
        self._audit = audit
        self._hooks = hooks
        self._clock = clock
        self._identity = identity
        self._consent = consent
        self._sessions = sessions

    def _cut_off(self, user_id: int) -> None:
        self._identity.forget_user(user_id)
        self._consent.forget_user(user_id)
        self._sessions.cut_off_user(
            user_id,
            Unauthenticated(
                "this person's data was erased; pair the device again to start over",
                reason="USER_ERASED",
            ),
        )

    async def erase(
        self, user_id: int, actor: Actor, *, scrub: bool = True
    ) -> tuple[DeletionReceipt, ScrubReport | None]:
        """Delete everything of the person; the signed receipt and what scrubbing cost."""
        person = await self._storage.person(user_id)
        if person is None:
            raise NotFound("no such user (already erased?)", reason="USER_NOT_FOUND")
        pseudonym = self._key.pseudonym(user_id, person.create_us)
        tables = await self._storage.user_tables()
        self._cut_off(user_id)

        salt = secrets.token_hex(_SALT_BYTES)
        signed: list[DeletionReceipt] = []

        def records(counts: dict[str, int]) -> tuple[ReceiptRow, AuditRow]:
            unsigned = DeletionReceipt(
                receipt_id=str(uuid.uuid4()),
                erase_us=self._clock.now_us(),
                deleted_counts=counts,
                subject_salt=salt,
                subject_hash=subject_hash(salt, person.name),
            )
            receipt = DeletionReceipt(
                unsigned.receipt_id,
                unsigned.erase_us,
                counts,
                salt,
                unsigned.subject_hash,
                self._key.sign(unsigned.canonical()),
            )
            signed.append(receipt)
            return (
                ReceiptRow(
                    receipt.receipt_id,
                    receipt.erase_us,
                    receipt.subject_hash,
                    json.dumps(counts, sort_keys=True),
                    receipt.signature,
                ),
                self._audit.row(
                    Action.ERASE,
                    actor,
                    pseudonym,
                    {"receipt_id": receipt.receipt_id, "deleted": counts},
                ),
            )

        await self._storage.erase_rows(user_id, tables, records)
        receipt = signed[-1]
        # No await between the commit and this: a request waiting for the write lock is
        # cancelled before it can write anything of the person again.
        self._cut_off(user_id)

        failed: list[str] = []
        for name, hook in self._hooks.erase_hooks:
            try:
                await hook(user_id)
            except Exception:
                log.exception("erase hook failed", extra={"hook": name})
                failed.append(name)
        if failed:
            await self._audit.record(
                Action.ERASE, Actor.SYSTEM, pseudonym, {"failed_hooks": failed}
            )
        stragglers = await self._storage.sweep_rows(user_id, tables)
        if stragglers:
            log.warning("erasure swept late rows", extra={"rows": stragglers})

        report: ScrubReport | None = None
        if scrub:
            report = await self._storage.scrub()
            if report is not None:
                log.info(
                    "erased a person",
                    extra={
                        "receipt_id": receipt.receipt_id,
                        "vacuum_s": round(report.vacuum_seconds, 4),
                        "checkpoint_busy": report.checkpoint_busy,
                    },
                )
        return receipt, report
