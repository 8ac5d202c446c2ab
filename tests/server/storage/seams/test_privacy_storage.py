"""The privacy storage seam behaves the same on SQLite and PostgreSQL: schema discovery,
erasure with its receipt and audit entry, export snapshots, summaries and retention."""

from __future__ import annotations

import json

from pulsesync.server.storage.privacy import AuditRow, HeldTable, ReceiptRow
from pulsesync.server.storage.profiles import SealedVersion
from tests.support.storage_backends import Backend

EVENT = (
    "INSERT INTO events (user_id, device_pk, seq, t_us, kind, received_us, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
QUARANTINE = (
    "INSERT INTO quarantine (user_id, device_pk, seq, event_id, reason, detail, received_us,"
    " body) VALUES (?, ?, ?, 'e', 'BAD', '', ?, ?)"
)


async def seed_person(b: Backend, name: str) -> tuple[int, int]:
    """A person with a device, three events, a profile version, a nudge with a push target."""
    user_id = await b.add_user(name)
    device = await b.add_device(user_id, f"dev_{name}")
    for seq in (1, 2, 3):
        await b.execute(
            EVENT, user_id, device, seq, seq * 100, 1, seq * 100, b"body-" + name.encode()
        )
    sealed = SealedVersion(1, "dk", b"n" * 12, b"secret-" + name.encode())
    assert await b.profiles.append(user_id, 0, sealed, f"dev_{name}", 5, keep=3)
    await b.execute(
        "INSERT INTO consent_ledger (user_id, category, granted, policy_version, device_id,"
        " change_us) VALUES (?, 1, 1, 'v1', 'admin', 1)",
        user_id,
    )
    await b.execute(
        "INSERT INTO nudges (user_id, nudge_id, decision_id, nudge_type, device_pk, title,"
        " message, data, probability, reasons, create_us, expire_us, deliver_us, state,"
        " outcome_metric) VALUES (?, ?, 1, 'walk', ?, 't', 'm', '{}', 0.5, '[]', 10, 99, ?,"
        " 'delivered', 'steps')",
        user_id,
        f"n_{name}",
        device,
        20,
    )
    await b.nudges.set_push_target(user_id, device, f"tok-{name}", 7)
    return user_id, device


def records(counts: dict[str, int]) -> tuple[ReceiptRow, AuditRow]:
    detail = json.dumps(counts, sort_keys=True)
    return (
        ReceiptRow("rcpt_1", 1000, "hash", detail, "sig"),
        AuditRow(1000, "erase", "admin", "hash", detail),
    )


async def test_user_tables_are_discovered_with_users_last(storage_backend: Backend) -> None:
    b = storage_backend
    await b.execute(
        "CREATE TABLE extra_notes (user_id BIGINT NOT NULL, note TEXT NOT NULL,"
        " note_secret TEXT NOT NULL)"
    )
    await b.execute("CREATE TABLE no_people (x INTEGER)")
    tables = await b.privacy.user_tables()
    names = [t.name for t in tables]
    assert names[-1] == "users"
    assert names[:-1] == sorted(names[:-1])
    for expected in ("devices", "events", "extra_notes", "nudges", "profile_versions"):
        assert expected in names
    assert "no_people" not in names
    assert "deletion_receipts" not in names
    extra = next(t for t in tables if t.name == "extra_notes")
    assert [c.name for c in extra.columns] == ["user_id", "note", "note_secret"]
    assert [c.name for c in extra.exported_columns] == ["user_id", "note"]


async def test_erasure_deletes_every_row_and_records_in_one_go(storage_backend: Backend) -> None:
    b = storage_backend
    ada, _ = await seed_person(b, "ada")
    bob, bob_device = await seed_person(b, "bob")
    tables = await b.privacy.user_tables()
    receipt, audit = await b.privacy.erase_rows(ada, tables, records)
    counts = json.loads(receipt.deleted_counts_json)
    assert counts["events"] == 3
    assert counts["profile_versions"] == 1
    assert counts["users"] == 1
    assert counts["consent_ledger"] == 1
    for t in tables:
        left = await b.scalar(f"SELECT COUNT(*) FROM {t.name} WHERE user_id = ?", ada)
        assert left == 0, t.name
    assert await b.privacy.person(ada) is None
    assert await b.privacy.user_ids() == [bob]
    assert await b.scalar("SELECT COUNT(*) FROM events WHERE user_id = ?", bob) == 3
    assert await b.scalar("SELECT subject_hash FROM deletion_receipts") == "hash"
    stored = await b.privacy.audit_entries(10, "erase")
    assert [e.row for e in stored] == [audit]
    # A row committed after the erasure (an ingest batch in flight) is swept.
    await b.execute(EVENT, ada, bob_device, 9, 900, 1, 900, b"late")
    assert await b.privacy.sweep_rows(ada, tables) == 1
    assert await b.privacy.sweep_rows(ada, tables) == 0
    report = await b.privacy.scrub()
    assert report is not None
    assert report.vacuum_seconds >= 0
    assert not report.checkpoint_busy


async def test_an_erased_persons_ids_are_never_given_out_again(storage_backend: Backend) -> None:
    """What is still keyed by an erased id after the commit (the erasure's hooks and late-row
    sweep, a cut-off signal, a cache) must never reach the next person paired."""
    b = storage_backend
    await seed_person(b, "ada")
    bob, bob_device = await seed_person(b, "bob")  # the largest ids
    await b.privacy.erase_rows(bob, await b.privacy.user_tables(), records)
    cy, cy_device = await seed_person(b, "cy")
    assert cy > bob
    assert cy_device > bob_device


async def test_export_is_a_snapshot_without_secrets(storage_backend: Backend) -> None:
    b = storage_backend
    ada, device = await seed_person(b, "ada")
    await seed_person(b, "bob")
    got: dict[str, list[dict[str, object]]] = {}
    order: list[str] = []
    async for table, row in b.privacy.export_rows(ada, frozenset({"profile_versions"})):
        if row is None:
            order.append(table.name)
            got[table.name] = []
        else:
            got[table.name].append(row)
    assert order[-1] == "users"
    assert "profile_versions" not in got
    assert [r["seq"] for r in sorted(got["events"], key=lambda r: str(r["seq"]))] == [1, 2, 3]
    assert all(r["user_id"] == ada for rows in got.values() for r in rows)
    assert got["devices"][0]["device_pk"] == device
    assert "token_hash" not in got["devices"][0]
    assert "push_token" not in got["nudge_push_targets"][0]
    assert got["users"] == [{"user_id": ada, "name": "ada", "create_us": 1}]

    # An export abandoned half way leaves storage usable (its snapshot is released).
    rows = b.privacy.export_rows(ada, frozenset())
    async for _ in rows:
        break
    await rows.aclose()  # type: ignore[attr-defined]
    await b.privacy.append_audit(AuditRow(5, "export", "admin", "s", "{}"))
    assert len(await b.privacy.audit_entries(10, None)) == 1


async def test_summary_counts_and_groups(storage_backend: Backend) -> None:
    b = storage_backend
    ada, device = await seed_person(b, "ada")
    await seed_person(b, "bob")
    held = [
        HeldTable("nudges", "create_us", "device_pk"),
        HeldTable("profile_versions", "create_us", "device_id"),
        HeldTable("missing_table", "t_us", None),
    ]
    s = await b.privacy.summary_rows(ada, held)
    assert [(e.kind, e.device_pk, e.count, e.first_us, e.last_us) for e in s.events] == [
        (1, device, 3, 100, 300)
    ]
    assert [(d.device_pk, d.device_id, d.last_seen_us) for d in s.devices] == [
        (device, "dev_ada", None)
    ]
    assert s.record_counts["events"] == 3
    assert s.record_counts["users"] == 1
    assert sorted((g.table, g.device, g.count, g.first_us, g.last_us) for g in s.held) == [
        ("nudges", device, 1, 10, 10),
        ("profile_versions", "dev_ada", 1, 5, 5),
    ]
    assert s.nudges_sent == 1


async def test_audit_log_newest_first_filtered_and_limited(storage_backend: Backend) -> None:
    p = storage_backend.privacy
    for i, action in enumerate(("export", "erase", "export", "consent")):
        await p.append_audit(AuditRow(i, action, "admin", f"s{i}", "{}"))
    assert [e.row.at_us for e in await p.audit_entries(10, None)] == [3, 2, 1, 0]
    assert [e.row.at_us for e in await p.audit_entries(10, "export")] == [2, 0]
    assert [e.row.at_us for e in await p.audit_entries(1, "export")] == [2]
    ids = [e.audit_id for e in await p.audit_entries(10, None)]
    assert ids == sorted(ids, reverse=True)


async def test_retention_deletes_in_chunks_per_person(storage_backend: Backend) -> None:
    b = storage_backend
    ada, device = await seed_person(b, "ada")
    bob, bob_device = await seed_person(b, "bob")
    assert await b.privacy.delete_events_before(ada, 250, 1) == 1
    assert await b.privacy.delete_events_before(ada, 250, 10) == 1
    assert await b.privacy.delete_events_before(ada, 250, 10) == 0
    assert await b.scalar("SELECT COUNT(*) FROM events WHERE user_id = ?", ada) == 1
    assert await b.scalar("SELECT COUNT(*) FROM events WHERE user_id = ?", bob) == 3
    for seq, at in ((1, 10), (2, 20), (3, 30)):
        await b.execute(QUARANTINE, ada, device, seq, at, b"q")
    await b.execute(QUARANTINE, bob, bob_device, 1, 15, b"q")
    assert await b.privacy.delete_quarantine_before(25, 2) == 2
    assert await b.privacy.delete_quarantine_before(25, 2) == 1
    assert await b.privacy.delete_quarantine_before(25, 2) == 0
    assert await b.scalar("SELECT COUNT(*) FROM quarantine") == 1
