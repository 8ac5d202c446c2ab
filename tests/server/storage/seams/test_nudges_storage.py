"""The nudge storage seam behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from pulsesync.server.storage.nudges import (
    DecisionRow,
    ImportedDecision,
    NewNudge,
    NudgeRow,
)
from tests.support.storage_backends import Backend

CONSENT_NUDGES = 3
ACTION_OPENED = 2


def decision(user_id: int, at: int, chosen: str = "walk") -> DecisionRow:
    return DecisionRow(
        user_id, at, "tick", "v1", json.dumps({"steps": at}), '["walk","none"]', "[]",
        chosen, 0.5, "{}",
    )  # fmt: skip


def nudge(nudge_id: str, at: int, device_pk: int, expire: int = 1_000) -> NewNudge:
    row = NudgeRow(nudge_id, "walk", "Walk", "Go", "{}", 0.5, "[]", at, at + expire)
    return NewNudge(row, device_pk, "steps")


async def test_decisions_nudges_delivery_and_expiry(storage_backend: Backend) -> None:
    b = storage_backend
    s = b.nudges
    ada = await b.add_user("ada")
    bob = await b.add_user("bob")
    phone = await b.add_device(ada, "dev_phone")
    watch = await b.add_device(ada, "dev_watch")
    bob_phone = await b.add_device(bob, "dev_bob")
    d1 = await s.log_decision(decision(ada, 100), nudge("n_b", 100, phone))
    d2 = await s.log_decision(decision(ada, 50), nudge("n_a", 50, phone, expire=100))
    d3 = await s.log_decision(decision(ada, 200, "none"), None)
    await s.log_decision(decision(bob, 120), nudge("n_c", 120, bob_phone))
    assert len({d1, d2, d3}) == 3
    assert await s.recent(ada, 0) == [("walk", 50), ("walk", 100)]
    assert await s.recent(ada, 50) == [("walk", 100)]
    assert [n.nudge_id for n in await s.pending(ada, phone, 120)] == ["n_a", "n_b"]
    assert [n.nudge_id for n in await s.pending(ada, phone, 150)] == ["n_b"]  # n_a expired
    assert await s.pending(ada, watch, 0) == []
    assert await s.pending(bob, phone, 0) == []
    await s.route("n_b", watch)
    assert [n.nudge_id for n in await s.pending(ada, watch, 120)] == ["n_b"]
    assert await s.mark_delivered("n_b", watch, "stream", 130)
    assert not await s.mark_delivered("n_b", watch, "push", 131)  # delivered once
    assert await s.expire(150) == 1  # n_a; n_c is not due, n_b was delivered
    assert await s.expire(150) == 0
    assert not await s.mark_delivered("n_a", phone, "stream", 151)
    assert await s.owns(ada, "n_b")
    assert not await s.owns(bob, "n_b")
    assert not await s.owns(ada, "n_missing")
    opened = await s.open_decisions(150)
    assert [(o.user_id, o.decision_us, o.nudge_id) for o in opened] == [
        (ada, 50, "n_a"),
        (ada, 100, "n_b"),
        (bob, 120, "n_c"),
    ]
    await s.complete_outcomes([(d2, 12.5)], [("n_a", 3.0), ("n_b", None)])
    assert [o.decision_us for o in await s.open_decisions(1_000)] == [100, 120, 200]
    log = await s.outcome_log()
    assert [(o.user_id, o.decision_us, o.outcome_steps, o.outcome_complete) for o in log] == [
        (ada, 50, 12.5, True),
        (ada, 100, None, False),
        (bob, 120, None, False),
        (ada, 200, None, False),
    ]


async def test_feedback_push_targets_and_history_pages(storage_backend: Backend) -> None:
    b = storage_backend
    s = b.nudges
    ada = await b.add_user("ada")
    bob = await b.add_user("bob")
    phone = await b.add_device(ada, "dev_phone")
    watch = await b.add_device(ada, "dev_watch")
    bob_phone = await b.add_device(bob, "dev_bob")
    # Mixed case: the page order must be byte order on both backends, whatever the locale.
    for nid, at in (("n_B", 100), ("n_a", 100), ("n_c", 90), ("n_d", 300)):
        await s.log_decision(decision(ada, at), nudge(nid, at, phone))
    await s.log_decision(decision(bob, 100), nudge("n_bob", 100, bob_phone))
    assert await s.mark_delivered("n_a", watch, "push", 110)
    assert await s.add_feedback(ada, "n_a", watch, ACTION_OPENED, 120, 121)
    assert not await s.add_feedback(ada, "n_a", watch, ACTION_OPENED, 122, 123)  # once
    assert await s.add_feedback(ada, "n_a", phone, 1, 119, 124)
    assert not await s.add_feedback(bob, "n_a", bob_phone, 1, 119, 124)  # not bob's nudge
    assert not await s.add_feedback(ada, "n_missing", phone, 1, 119, 124)
    assert await s.acted("n_a", ACTION_OPENED)
    assert not await s.acted("n_B", ACTION_OPENED)

    first = await s.history_page(ada, 0, 300, None, 2)
    assert [h.nudge.nudge_id for h in first] == ["n_B", "n_a"]
    last = first[-1]
    assert last.feedback == (1, ACTION_OPENED)  # by action time
    assert last.deliver_us == 110
    assert last.device_id == "dev_watch"
    assert first[0].deliver_us is None
    assert first[0].device_id == "dev_phone"
    rest = await s.history_page(ada, 0, 300, (last.nudge.create_us, last.nudge.nudge_id), 2)
    assert [h.nudge.nudge_id for h in rest] == ["n_c"]
    assert rest[0].feedback == ()

    await s.set_push_target(ada, phone, "tok-1", 10)
    await s.set_push_target(ada, phone, "tok-2", 11)
    await s.set_push_target(ada, watch, "tok-w", 12)
    await s.set_push_target(bob, bob_phone, "tok-b", 13)
    await b.execute("UPDATE devices SET revoke_us = 5 WHERE device_pk = ?", bob_phone)
    await s.set_push_target(ada, watch, "", 14)  # removed
    targets = await s.push_targets()
    assert [(t.device_pk, t.user_id, t.device_id, t.push_token, t.update_us) for t in targets] == [
        (phone, ada, "dev_phone", "tok-2", 11)
    ]
    # One device's target, as a replica reads it again when another one rings it.
    one = await s.push_target(phone)
    assert one is not None
    assert (one.device_pk, one.user_id, one.device_id, one.push_token, one.update_us) == (
        phone, ada, "dev_phone", "tok-2", 11
    )  # fmt: skip
    assert await s.push_target(watch) is None  # removed
    assert await s.push_target(bob_phone) is None  # its device is revoked
    assert await s.push_target(phone + watch + bob_phone) is None  # no such device


async def test_training_rows_follow_consent_and_merge_imported(storage_backend: Backend) -> None:
    b = storage_backend
    s = b.nudges
    ada = await b.add_user("ada")
    bob = await b.add_user("bob")
    phone = await b.add_device(ada, "dev_phone")
    bob_phone = await b.add_device(bob, "dev_bob")
    grant = (
        "INSERT INTO consent_ledger (user_id, category, granted, policy_version, device_id,"
        " change_us) VALUES (?, ?, ?, 'v1', 'admin', ?)"
    )
    await b.execute(grant, ada, CONSENT_NUDGES, 1, 1)
    await b.execute(grant, bob, CONSENT_NUDGES, 1, 1)
    await b.execute(grant, bob, CONSENT_NUDGES, 0, 2)  # bob withdrew: latest choice counts
    da = await s.log_decision(decision(ada, 100), nudge("n_a", 100, phone))
    db = await s.log_decision(decision(bob, 110), nudge("n_b", 110, bob_phone))
    d_old = await s.log_decision(decision(ada, 10), None)
    await s.log_decision(decision(ada, 130), None)  # incomplete: not training data
    await s.complete_outcomes([(da, 5.0), (db, 6.0), (d_old, 1.0)], [])
    assert await s.add_feedback(ada, "n_a", phone, ACTION_OPENED, 101, 102)
    imported = [
        ImportedDecision("p1", 105, "{}", "[]", "walk", 0.3, 2.0),
        ImportedDecision("p2", 95, "{}", "[]", "none", 0.7, 1.0),
        ImportedDecision("p1", 5, "{}", "[]", "none", 0.7, 1.0),
    ]
    assert await s.replace_imported("trial", imported) == 3
    assert await s.replace_imported("trial", imported[:2]) == 2  # replaced, not added
    rows = await s.training_rows(50, ACTION_OPENED, CONSENT_NUDGES)
    assert [(r.decision_us, r.acted, r.outcome_steps) for r in rows] == [
        (95, False, 1.0),
        (100, True, 5.0),
        (105, False, 2.0),
    ]
    assert rows[1].user_id == ada
    assert rows[0].user_id < 0
    assert rows[2].user_id < 0
    assert rows[0].user_id != rows[2].user_id
    assert await b.scalar("SELECT COUNT(*) FROM imported_decisions") == 2
