"""SQLite implementation of the nudge storage seam."""

from __future__ import annotations

from typing import Final

from pulsesync.server.storage.db import Database
from pulsesync.server.storage.nudges import (
    NUDGE_COLUMNS,
    DecisionRow,
    ImportedDecision,
    LoggedOutcome,
    NewNudge,
    NudgeHistoryRow,
    NudgeRow,
    OpenDecision,
    PushTargetRow,
    TrainingRow,
)

_CONSENTING: Final = (
    "SELECT c.user_id FROM consent_ledger c WHERE c.category = ? AND c.granted = 1"
    " AND c.entry_id = (SELECT MAX(entry_id) FROM consent_ledger"
    " WHERE user_id = c.user_id AND category = c.category)"
)


class SqliteNudgeStorage:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def log_decision(self, decision: DecisionRow, nudge: NewNudge | None) -> int:
        d = decision
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO nudge_decisions (user_id, decision_us, trigger, policy_version,"
                " features, options, ineligible, chosen, probability, predicted, nudge_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (d.user_id, d.decision_us, d.trigger, d.policy_version, d.features_json,
                 d.options_json, d.ineligible_json, d.chosen, d.probability, d.predicted_json,
                 nudge.row.nudge_id if nudge else None),
            )  # fmt: skip
            decision_id = int(cur.lastrowid or 0)
            if nudge is not None:
                n = nudge.row
                await tx.execute(
                    "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk,"
                    " title, message, data, probability, reasons, create_us, expire_us, state,"
                    " outcome_metric) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',?)",
                    (n.nudge_id, d.user_id, decision_id, n.nudge_type, nudge.device_pk, n.title,
                     n.message, n.data_json, n.probability, n.reasons_json, n.create_us,
                     n.expire_us, nudge.outcome_metric),
                )  # fmt: skip
        return decision_id

    async def recent(self, user_id: int, since_us: int) -> list[tuple[str, int]]:
        async with self._db.reader.execute(
            "SELECT nudge_type, create_us FROM nudges WHERE user_id = ? AND create_us > ?"
            " ORDER BY create_us",
            (user_id, since_us),
        ) as cur:
            return [(str(t), int(at)) for t, at in await cur.fetchall()]

    async def pending(self, user_id: int, device_pk: int, now_us: int) -> list[NudgeRow]:
        async with self._db.reader.execute(
            f"SELECT {NUDGE_COLUMNS} FROM nudges n WHERE n.user_id = ? AND n.device_pk = ?"
            " AND n.state = 'pending' AND n.expire_us > ? ORDER BY n.create_us",
            (user_id, device_pk, now_us),
        ) as cur:
            return [NudgeRow.from_row(r) for r in await cur.fetchall()]

    async def mark_delivered(
        self, nudge_id: str, device_pk: int, channel: str, now_us: int
    ) -> bool:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE nudges SET state = 'delivered', deliver_us = ?, device_pk = ?, channel = ?"
                " WHERE nudge_id = ? AND state = 'pending'",
                (now_us, device_pk, channel, nudge_id),
            )
            return bool(cur.rowcount)

    async def route(self, nudge_id: str, device_pk: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE nudges SET device_pk = ? WHERE nudge_id = ?", (device_pk, nudge_id)
            )

    async def expire(self, now_us: int) -> int:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE nudges SET state = 'expired' WHERE state = 'pending' AND expire_us <= ?",
                (now_us,),
            )
            return int(cur.rowcount or 0)

    async def push_targets(self) -> list[PushTargetRow]:
        async with self._db.reader.execute(
            "SELECT t.device_pk, t.user_id, d.device_id, d.kind, t.push_token, t.update_us"
            " FROM nudge_push_targets t JOIN devices d ON d.device_pk = t.device_pk"
            " WHERE d.revoke_us IS NULL"
        ) as cur:
            return [
                PushTargetRow(int(pk), int(uid), str(dev), int(kind), str(token), int(at))
                for pk, uid, dev, kind, token, at in await cur.fetchall()
            ]

    async def push_target(self, device_pk: int) -> PushTargetRow | None:
        async with self._db.reader.execute(
            "SELECT t.device_pk, t.user_id, d.device_id, d.kind, t.push_token, t.update_us"
            " FROM nudge_push_targets t JOIN devices d ON d.device_pk = t.device_pk"
            " WHERE t.device_pk = ? AND d.revoke_us IS NULL",
            (device_pk,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        pk, uid, dev, kind, token, at = row
        return PushTargetRow(int(pk), int(uid), str(dev), int(kind), str(token), int(at))

    async def set_push_target(
        self, user_id: int, device_pk: int, push_token: str, now_us: int
    ) -> None:
        async with self._db.transaction() as tx:
            if push_token:
                await tx.execute(
                    "INSERT INTO nudge_push_targets (device_pk, user_id, push_token, update_us)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (device_pk) DO UPDATE SET"
                    " push_token = excluded.push_token, update_us = excluded.update_us",
                    (device_pk, user_id, push_token, now_us),
                )
            else:
                await tx.execute("DELETE FROM nudge_push_targets WHERE device_pk = ?", (device_pk,))

    async def owns(self, user_id: int, nudge_id: str) -> bool:
        async with self._db.reader.execute(
            "SELECT 1 FROM nudges WHERE nudge_id = ? AND user_id = ?", (nudge_id, user_id)
        ) as cur:
            return await cur.fetchone() is not None

    async def add_feedback(
        self,
        user_id: int,
        nudge_id: str,
        device_pk: int,
        action: int,
        action_us: int,
        received_us: int,
    ) -> bool:
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT OR IGNORE INTO nudge_feedback"
                " (user_id, nudge_id, device_pk, action, action_us, received_us)"
                " SELECT user_id, nudge_id, ?, ?, ?, ? FROM nudges"
                " WHERE nudge_id = ? AND user_id = ?",
                (device_pk, action, action_us, received_us, nudge_id, user_id),
            )
            return bool(cur.rowcount)

    async def acted(self, nudge_id: str, action: int) -> bool:
        async with self._db.reader.execute(
            "SELECT 1 FROM nudge_feedback WHERE nudge_id = ? AND action = ? LIMIT 1",
            (nudge_id, action),
        ) as cur:
            return await cur.fetchone() is not None

    async def open_decisions(self, decided_before_us: int) -> list[OpenDecision]:
        async with self._db.reader.execute(
            "SELECT decision_id, user_id, decision_us, chosen, nudge_id, features"
            " FROM nudge_decisions WHERE outcome_complete = 0 AND decision_us <= ?"
            " ORDER BY decision_us",
            (decided_before_us,),
        ) as cur:
            return [
                OpenDecision(int(d), int(u), int(t), str(c), n, str(f))
                for d, u, t, c, n, f in await cur.fetchall()
            ]

    async def complete_outcomes(
        self, decisions: list[tuple[int, float]], nudges: list[tuple[str, float | None]]
    ) -> None:
        async with self._db.transaction() as tx:
            await tx.executemany(
                "UPDATE nudge_decisions SET outcome_steps = ?, outcome_complete = 1"
                " WHERE decision_id = ?",
                [(steps, decision_id) for decision_id, steps in decisions],
            )
            await tx.executemany(
                "UPDATE nudges SET outcome_value = ?, outcome_complete = 1 WHERE nudge_id = ?",
                [(value, nudge_id) for nudge_id, value in nudges],
            )

    async def history_page(
        self,
        user_id: int,
        start_us: int,
        end_us: int,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[NudgeHistoryRow]:
        keyset = ""
        params: list[int | str] = [user_id, start_us, end_us]
        if after is not None:
            keyset = " AND (n.create_us < ? OR (n.create_us = ? AND n.nudge_id > ?))"
            params += [after[0], after[0], after[1]]
        async with self._db.reader.execute(
            f"SELECT {NUDGE_COLUMNS}, n.deliver_us, n.outcome_metric, n.outcome_value,"
            " n.outcome_complete, d.device_id"
            " FROM nudges n LEFT JOIN devices d ON d.device_pk = n.device_pk"
            " WHERE n.user_id = ? AND n.create_us >= ? AND n.create_us < ?"
            + keyset
            + " ORDER BY n.create_us DESC, n.nudge_id LIMIT ?",
            (*params, limit),
        ) as cur:
            rows = list(await cur.fetchall())
        feedback: dict[str, list[int]] = {str(r[0]): [] for r in rows}
        if rows:  # one query for the page's feedback, not one per nudge
            marks = ",".join("?" * len(rows))
            async with self._db.reader.execute(
                "SELECT nudge_id, action FROM nudge_feedback"
                f" WHERE user_id = ? AND nudge_id IN ({marks}) ORDER BY action_us, feedback_id",
                (user_id, *feedback),
            ) as cur:
                for nudge_id, action in await cur.fetchall():
                    feedback[str(nudge_id)].append(int(action))
        return [NudgeHistoryRow.from_row(r, tuple(feedback[str(r[0])])) for r in rows]

    async def training_rows(
        self, since_us: int, acted_action: int, consent_category: int
    ) -> list[TrainingRow]:
        async with self._db.reader.execute(
            "SELECT d.user_id, d.decision_us, d.features, d.options, d.chosen, d.probability,"
            " d.outcome_steps, EXISTS (SELECT 1 FROM nudge_feedback f"
            " WHERE f.nudge_id = d.nudge_id AND f.user_id = d.user_id AND f.action = ?)"
            " FROM nudge_decisions d WHERE d.outcome_complete = 1 AND d.decision_us >= ?"
            f" AND d.user_id IN ({_CONSENTING}) ORDER BY d.decision_us, d.decision_id",
            (acted_action, since_us, consent_category),
        ) as cur:
            rows = list(await cur.fetchall())
        # Imported decisions: their people have negative ids, ordered with the server's own.
        async with self._db.reader.execute(
            "SELECT -person_key, decision_us, features, options, chosen, probability,"
            " outcome_steps, 0 FROM imported_decisions WHERE decision_us >= ?"
            " ORDER BY decision_us, row_id",
            (since_us,),
        ) as cur:
            imported = list(await cur.fetchall())
        if imported:
            rows = sorted([*rows, *imported], key=lambda r: int(r[1]))
        return [TrainingRow.from_row(r) for r in rows]

    async def replace_imported(self, source: str, rows: list[ImportedDecision]) -> int:
        async with self._db.transaction() as conn:
            await conn.execute("DELETE FROM imported_decisions WHERE source = ?", (source,))
            for person in sorted({r.person for r in rows}):
                await conn.execute(
                    "INSERT OR IGNORE INTO imported_people (source, person) VALUES (?, ?)",
                    (source, person),
                )
            async with conn.execute(
                "SELECT person, person_key FROM imported_people WHERE source = ?", (source,)
            ) as cur:
                key = {str(p): int(k) for p, k in await cur.fetchall()}
            await conn.executemany(
                "INSERT INTO imported_decisions (source, person_key, decision_us, features,"
                " options, chosen, probability, outcome_steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (source, key[r.person], r.decision_us, r.features_json, r.options_json,
                     r.chosen, r.probability, r.outcome_steps)
                    for r in rows
                ],
            )  # fmt: skip
        return len(rows)

    async def outcome_log(self) -> list[LoggedOutcome]:
        async with self._db.reader.execute(
            "SELECT user_id, decision_us, policy_version, options, chosen, probability,"
            " outcome_steps, outcome_complete FROM nudge_decisions ORDER BY decision_us"
        ) as cur:
            return [LoggedOutcome.from_row(r) for r in await cur.fetchall()]
