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

import asyncio
import hashlib
import json
import logging
import secrets
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pulsesync.server.context import AppContext
from pulsesync.server.errors import NotFound, Unauthenticated
from pulsesync.server.privacy.audit import Action, Actor, AuditLog
from pulsesync.server.privacy.keys import ReceiptKey
from pulsesync.server.privacy.tables import USER_COLUMN, quote, user_tables
from pulsesync.server.storage.db import BUSY_TIMEOUT_MS

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


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What making freed bytes unrecoverable cost."""

    vacuum_seconds: float
    checkpoint_seconds: float
    checkpoint_busy: bool
    db_bytes_before: int  # database file plus WAL
    db_bytes_after: int


def scrub_file(path: Path) -> ScrubReport:
    """VACUUM and truncate the WAL of the database at path (blocking; run in a thread).

    VACUUM rewrites every page, so no freed page survives in the file; the TRUNCATE
    checkpoint copies the rewritten pages home and empties the log that still held the old
    versions. A separate connection takes SQLite's own locks (waiting up to the busy timeout
    for a running transaction), so the server keeps serving meanwhile.
    """
    before = _on_disk(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA temp_store = MEMORY")  # no temporary file holding a copy
        t0 = time.perf_counter()
        conn.execute("VACUUM")
        t1 = time.perf_counter()
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        t2 = time.perf_counter()
    finally:
        conn.close()
    return ScrubReport(t1 - t0, t2 - t1, bool(busy), before, _on_disk(path))


def _on_disk(path: Path) -> int:
    """Bytes of the database file plus its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


class Eraser:
    """Erases one person at a time."""

    def __init__(self, app: AppContext, key: ReceiptKey, audit: AuditLog) -> None:
        self._app = app
        self._key = key
        self._audit = audit

    def _cut_off(self, user_id: int) -> None:
        self._app.identity.forget_user(user_id)
        self._app.consent.forget_user(user_id)
        self._app.sessions.cut_off_user(
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
        db = self._app.db
        async with db.reader.execute(
            "SELECT name, create_us FROM users WHERE user_id = ?", (user_id,)
        ) as c:
            row = await c.fetchone()
        if row is None:
            raise NotFound("no such user (already erased?)", reason="USER_NOT_FOUND")
        user_name, create_us = str(row[0]), int(row[1])
        pseudonym = self._key.pseudonym(user_id, create_us)
        tables = await user_tables(db.reader)
        self._cut_off(user_id)

        salt = secrets.token_hex(_SALT_BYTES)
        counts: dict[str, int] = {}
        async with db.transaction() as tx:
            await tx.execute("PRAGMA secure_delete = ON")
            # Components' tables may reference each other; check references at commit, when
            # all of the person's rows are gone, rather than after each statement.
            await tx.execute("PRAGMA defer_foreign_keys = ON")
            for table in tables:
                cur = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = ?", (user_id,)
                )
                counts[table.name] = max(cur.rowcount, 0)
            unsigned = DeletionReceipt(
                receipt_id=str(uuid.uuid4()),
                erase_us=self._app.clock.now_us(),
                deleted_counts=counts,
                subject_salt=salt,
                subject_hash=subject_hash(salt, user_name),
            )
            receipt = DeletionReceipt(
                unsigned.receipt_id,
                unsigned.erase_us,
                counts,
                salt,
                unsigned.subject_hash,
                self._key.sign(unsigned.canonical()),
            )
            await tx.execute(
                "INSERT INTO deletion_receipts (receipt_id, erase_us, subject_hash, deleted_counts, signature)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    receipt.receipt_id,
                    receipt.erase_us,
                    receipt.subject_hash,
                    json.dumps(counts, sort_keys=True),
                    receipt.signature,
                ),
            )
            await tx.execute(
                *self._audit.insert(
                    Action.ERASE,
                    actor,
                    pseudonym,
                    {"receipt_id": receipt.receipt_id, "deleted": counts},
                )
            )
        # No await between the commit and this: a request waiting for the write lock is
        # cancelled before it can write anything of the person again.
        self._cut_off(user_id)

        failed: list[str] = []
        for name, hook in self._app.user_data.erase_hooks:
            try:
                await hook(user_id)
            except Exception:
                log.exception("erase hook failed", extra={"hook": name})
                failed.append(name)
        if failed:
            await self._audit.record(
                Action.ERASE, Actor.SYSTEM, pseudonym, {"failed_hooks": failed}
            )
        stragglers = 0
        async with db.transaction() as tx:
            for table in tables:
                cur = await tx.execute(
                    f"DELETE FROM {quote(table.name)} WHERE {USER_COLUMN} = ?", (user_id,)
                )
                stragglers += max(cur.rowcount, 0)
        if stragglers:
            log.warning("erasure swept late rows", extra={"rows": stragglers})

        report: ScrubReport | None = None
        if scrub and str(db.path) != ":memory:":
            report = await asyncio.to_thread(scrub_file, db.path)
            log.info(
                "erased a person",
                extra={
                    "receipt_id": receipt.receipt_id,
                    "vacuum_s": round(report.vacuum_seconds, 4),
                    "checkpoint_busy": report.checkpoint_busy,
                },
            )
        return receipt, report
