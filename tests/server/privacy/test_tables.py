"""Every table that can hold a person's data is found by export and erasure."""

from __future__ import annotations

from pulsesync.server.app import RunningServer
from pulsesync.server.privacy.summary import summarize
from pulsesync.server.storage.sqlite.privacy import all_tables, user_tables
from tests.support.server import pair_device

# Tables without a user_id column, each with the reason it holds nothing of a person.
NOT_PERSONAL = {
    "schema_migrations": "migration bookkeeping",
    "privacy_audit": "pseudonymous by design; must outlive erasure",
    "deletion_receipts": "salted hashes only; must outlive erasure",
    "profile_vault": "the id of the key vault holding the data keys; names nobody",
    "server_secrets": "keys of the server as a whole (the page-token key); names nobody",
    "imported_people": "pseudonymous ids from an imported decision log; not server users",
    "imported_decisions": "decisions from an imported log (nudges import-log); not server users",
    "nudge_models": "trained nudge models of the whole deployment; name nobody",
    "nudge_model_promoted": "which nudge model is promoted; names nobody",
}


async def test_every_table_has_a_user_id_or_is_known_not_to_be_personal(
    server: RunningServer,
) -> None:
    tables = await all_tables(server.app.db.reader)
    unkeyed = {t.name for t in tables if not t.has("user_id")}
    assert unkeyed == set(NOT_PERSONAL), (
        "a new table without a user_id column would escape export and erasure: add the "
        "column (preferred) or, if it truly holds nothing of a person, list it here"
    )
    found = [t.name for t in await user_tables(server.app.db.reader)]
    assert found[-1] == "users"


async def test_nudges_sent_are_counted_from_the_nudges_table(server: RunningServer) -> None:
    await pair_device(server, "ada")
    uid = await server.app.identity.user_id_by_name("ada")
    async with server.app.db.transaction() as tx:
        for i, delivered in enumerate((1_000, None, 2_000)):
            await tx.execute(
                "INSERT INTO nudges (nudge_id, user_id, decision_id, nudge_type, title, message,"
                " data, probability, reasons, create_us, expire_us, deliver_us, state,"
                " outcome_metric) VALUES (?, ?, 1, 'walk', 't', 'm', '{}', 0.5, '[]', 0, 1, ?,"
                " 'delivered', 'steps')",
                (f"n{i}", uid, delivered),
            )
    summary = await summarize(server.app.storage.privacy, uid, "ada", (), 1)
    assert summary.nudges_sent == 2
    assert summary.record_counts["nudges"] == 3
