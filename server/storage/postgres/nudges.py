"""PostgreSQL implementation of the nudge storage seam, with the SQLite one's semantics.

Ordering matches SQLite's: ties in time are broken by the row's id (SQLite's rowid order), and
nudge ids are compared byte-wise (COLLATE "C"), as SQLite's BINARY collation does, so a
keyset page never depends on the database's locale. Joins to `devices` name the person too,
which keeps each on one shard when the tables are distributed by user_id.
"""

from __future__ import annotations

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
from pulsesync.server.storage.postgres.pool import PostgresPool
from pulsesync.server.storage.postgres.profiles import affected


# People whose latest choice for the category (parameter $n) grants it.
def _consenting(param: int) -> str:
    return (
        "SELECT c.user_id FROM consent_ledger c WHERE c.category = "
        f"${param} AND c.granted = 1 AND c.entry_id = (SELECT MAX(entry_id) FROM consent_ledger"
        " WHERE user_id = c.user_id AND category = c.category)"
    )


class PostgresNudgeStorage:
    def __init__(self, pool: PostgresPool) -> None:
        self._pool = pool

    async def log_decision(self, decision: DecisionRow, nudge: NewNudge | None) -> int:
        d = decision
        async with self._pool.transaction() as tx:
            decision_id = int(
                await tx.fetchval(
                    "INSERT INTO nudge_decisions (user_id, decision_us, trigger, policy_version,"
                    " features, options, ineligible, chosen, probability, predicted, nudge_id)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) RETURNING decision_id",
                    d.user_id, d.decision_us, d.trigger, d.policy_version, d.features_json,
                    d.options_json, d.ineligible_json, d.chosen, d.probability,
                    d.predicted_json, nudge.row.nudge_id if nudge else None,
                )
            )  # fmt: skip
            if nudge is not None:
                n = nudge.row
                await tx.execute(
                    "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, device_pk,"
                    " title, message, data, probability, reasons, create_us, expire_us, state,"
                    " outcome_metric) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,'pending',"
                    "$13)",
                    n.nudge_id, d.user_id, decision_id, n.nudge_type, nudge.device_pk, n.title,
                    n.message, n.data_json, n.probability, n.reasons_json, n.create_us,
                    n.expire_us, nudge.outcome_metric,
                )  # fmt: skip
        return decision_id

    async def recent(self, user_id: int, since_us: int) -> list[tuple[str, int]]:
        rows = await self._pool.fetch(
            "SELECT nudge_type, create_us FROM nudges WHERE user_id = $1 AND create_us > $2"
            " ORDER BY create_us, decision_id",
            user_id,
            since_us,
        )
        return [(str(t), int(at)) for t, at in rows]

    async def pending(self, user_id: int, device_pk: int, now_us: int) -> list[NudgeRow]:
        rows = await self._pool.fetch(
            f"SELECT {NUDGE_COLUMNS} FROM nudges n WHERE n.user_id = $1 AND n.device_pk = $2"
            " AND n.state = 'pending' AND n.expire_us > $3 ORDER BY n.create_us, n.decision_id",
            user_id,
            device_pk,
            now_us,
        )
        return [NudgeRow.from_row(r) for r in rows]

    async def mark_delivered(
        self, nudge_id: str, device_pk: int, channel: str, now_us: int
    ) -> bool:
        async with self._pool.transaction() as tx:
            status = await tx.execute(
                "UPDATE nudges SET state = 'delivered', deliver_us = $1, device_pk = $2,"
                " channel = $3 WHERE nudge_id = $4 AND state = 'pending'",
                now_us,
                device_pk,
                channel,
                nudge_id,
            )
        return affected(status) > 0

    async def route(self, nudge_id: str, device_pk: int) -> None:
        await self._pool.execute(
            "UPDATE nudges SET device_pk = $1 WHERE nudge_id = $2", device_pk, nudge_id
        )

    async def expire(self, now_us: int) -> int:
        status = await self._pool.execute(
            "UPDATE nudges SET state = 'expired' WHERE state = 'pending' AND expire_us <= $1",
            now_us,
        )
        return affected(status)

    async def push_targets(self) -> list[PushTargetRow]:
        rows = await self._pool.fetch(
            "SELECT t.device_pk, t.user_id, d.device_id, d.kind, t.push_token, t.update_us"
            " FROM nudge_push_targets t JOIN devices d"
            " ON d.user_id = t.user_id AND d.device_pk = t.device_pk"
            " WHERE d.revoke_us IS NULL ORDER BY t.device_pk"
        )
        return [
            PushTargetRow(int(pk), int(uid), str(dev), int(kind), str(token), int(at))
            for pk, uid, dev, kind, token, at in rows
        ]

    async def push_target(self, device_pk: int) -> PushTargetRow | None:
        # By device alone (the ring carries no person): the devices_by_pk index finds the
        # person, then the target's primary key.
        rows = await self._pool.fetch(
            "SELECT t.device_pk, t.user_id, d.device_id, d.kind, t.push_token, t.update_us"
            " FROM devices d JOIN nudge_push_targets t"
            " ON t.user_id = d.user_id AND t.device_pk = d.device_pk"
            " WHERE d.device_pk = $1 AND d.revoke_us IS NULL",
            device_pk,
        )
        if not rows:
            return None
        pk, uid, dev, kind, token, at = rows[0]
        return PushTargetRow(int(pk), int(uid), str(dev), int(kind), str(token), int(at))

    async def set_push_target(
        self, user_id: int, device_pk: int, push_token: str, now_us: int
    ) -> None:
        if push_token:
            await self._pool.execute(
                "INSERT INTO nudge_push_targets (device_pk, user_id, push_token, update_us)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, device_pk) DO UPDATE SET"
                " push_token = excluded.push_token, update_us = excluded.update_us",
                device_pk,
                user_id,
                push_token,
                now_us,
            )
        else:
            await self._pool.execute(
                "DELETE FROM nudge_push_targets WHERE user_id = $1 AND device_pk = $2",
                user_id,
                device_pk,
            )

    async def owns(self, user_id: int, nudge_id: str) -> bool:
        found = await self._pool.fetchval(
            "SELECT 1 FROM nudges WHERE user_id = $1 AND nudge_id = $2", user_id, nudge_id
        )
        return found is not None

    async def add_feedback(
        self,
        user_id: int,
        nudge_id: str,
        device_pk: int,
        action: int,
        action_us: int,
        received_us: int,
    ) -> bool:
        status = await self._pool.execute(
            "INSERT INTO nudge_feedback"
            " (user_id, nudge_id, device_pk, action, action_us, received_us)"
            " SELECT user_id, nudge_id, $1, $2, $3, $4 FROM nudges"
            " WHERE user_id = $5 AND nudge_id = $6"
            " ON CONFLICT (user_id, nudge_id, action) DO NOTHING",
            device_pk,
            action,
            action_us,
            received_us,
            user_id,
            nudge_id,
        )
        return affected(status) > 0

    async def acted(self, nudge_id: str, action: int) -> bool:
        found = await self._pool.fetchval(
            "SELECT 1 FROM nudge_feedback WHERE nudge_id = $1 AND action = $2 LIMIT 1",
            nudge_id,
            action,
        )
        return found is not None

    async def open_decisions(self, decided_before_us: int) -> list[OpenDecision]:
        rows = await self._pool.fetch(
            "SELECT decision_id, user_id, decision_us, chosen, nudge_id, features"
            " FROM nudge_decisions WHERE outcome_complete = 0 AND decision_us <= $1"
            " ORDER BY decision_us, decision_id",
            decided_before_us,
        )
        return [
            OpenDecision(int(d), int(u), int(t), str(c), None if n is None else str(n), str(f))
            for d, u, t, c, n, f in rows
        ]

    async def complete_outcomes(
        self, decisions: list[tuple[int, float]], nudges: list[tuple[str, float | None]]
    ) -> None:
        async with self._pool.transaction() as tx:
            if decisions:
                await tx.executemany(
                    "UPDATE nudge_decisions SET outcome_steps = $1, outcome_complete = 1"
                    " WHERE decision_id = $2",
                    [(steps, decision_id) for decision_id, steps in decisions],
                )
            if nudges:
                await tx.executemany(
                    "UPDATE nudges SET outcome_value = $1, outcome_complete = 1"
                    " WHERE nudge_id = $2",
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
            keyset = ' AND (n.create_us < $4 OR (n.create_us = $4 AND n.nudge_id > $5 COLLATE "C"))'
            params += [after[0], after[1]]
        async with self._pool.transaction(isolation="repeatable_read", readonly=True) as tx:
            rows = await tx.fetch(
                f"SELECT {NUDGE_COLUMNS}, n.deliver_us, n.outcome_metric, n.outcome_value,"
                " n.outcome_complete, d.device_id"
                " FROM nudges n LEFT JOIN devices d"
                " ON d.user_id = n.user_id AND d.device_pk = n.device_pk"
                " WHERE n.user_id = $1 AND n.create_us >= $2 AND n.create_us < $3"
                + keyset
                + f' ORDER BY n.create_us DESC, n.nudge_id COLLATE "C" LIMIT ${len(params) + 1}',
                *params,
                limit,
            )
            feedback: dict[str, list[int]] = {str(r[0]): [] for r in rows}
            if rows:  # one query for the page's feedback, not one per nudge
                for nudge_id, action in await tx.fetch(
                    "SELECT nudge_id, action FROM nudge_feedback"
                    " WHERE user_id = $1 AND nudge_id = ANY($2::text[])"
                    " ORDER BY action_us, feedback_id",
                    user_id,
                    list(feedback),
                ):
                    feedback[str(nudge_id)].append(int(action))
        return [NudgeHistoryRow.from_row(r, tuple(feedback[str(r[0])])) for r in rows]

    async def training_rows(
        self, since_us: int, acted_action: int, consent_category: int
    ) -> list[TrainingRow]:
        async with self._pool.transaction(isolation="repeatable_read", readonly=True) as tx:
            own = await tx.fetch(
                "SELECT d.user_id, d.decision_us, d.features, d.options, d.chosen,"
                " d.probability, d.outcome_steps, EXISTS (SELECT 1 FROM nudge_feedback f"
                " WHERE f.user_id = d.user_id AND f.nudge_id = d.nudge_id AND f.action = $1)"
                " FROM nudge_decisions d WHERE d.outcome_complete = 1 AND d.decision_us >= $2"
                f" AND d.user_id IN ({_consenting(3)}) ORDER BY d.decision_us, d.decision_id",
                acted_action,
                since_us,
                consent_category,
            )
            # Imported decisions: their people have negative ids, ordered with the server's own.
            imported = await tx.fetch(
                "SELECT -person_key, decision_us, features, options, chosen, probability,"
                " outcome_steps, false FROM imported_decisions WHERE decision_us >= $1"
                " ORDER BY decision_us, row_id",
                since_us,
            )
        rows = [tuple(r) for r in own]
        if imported:
            rows = sorted([*rows, *(tuple(r) for r in imported)], key=lambda r: int(r[1]))
        return [TrainingRow.from_row(r) for r in rows]

    async def replace_imported(self, source: str, rows: list[ImportedDecision]) -> int:
        async with self._pool.transaction() as tx:
            await tx.execute("DELETE FROM imported_decisions WHERE source = $1", source)
            people = sorted({r.person for r in rows})
            if people:
                await tx.executemany(
                    "INSERT INTO imported_people (source, person) VALUES ($1, $2)"
                    " ON CONFLICT (source, person) DO NOTHING",
                    [(source, p) for p in people],
                )
            key = {
                str(p): int(k)
                for p, k in await tx.fetch(
                    "SELECT person, person_key FROM imported_people WHERE source = $1", source
                )
            }
            if rows:
                await tx.executemany(
                    "INSERT INTO imported_decisions (source, person_key, decision_us, features,"
                    " options, chosen, probability, outcome_steps)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    [
                        (source, key[r.person], r.decision_us, r.features_json, r.options_json,
                         r.chosen, r.probability, r.outcome_steps)
                        for r in rows
                    ],
                )  # fmt: skip
        return len(rows)

    async def outcome_log(self) -> list[LoggedOutcome]:
        rows = await self._pool.fetch(
            "SELECT user_id, decision_us, policy_version, options, chosen, probability,"
            " outcome_steps, outcome_complete FROM nudge_decisions"
            " ORDER BY decision_us, decision_id"
        )
        return [LoggedOutcome.from_row(r) for r in rows]
