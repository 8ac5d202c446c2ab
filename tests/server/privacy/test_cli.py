"""`pulsesync privacy ...` on a database file, with no server running."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pulsesync.kinds import kind_of
from pulsesync.server.cli import main
from pulsesync.server.clock import SystemClock
from pulsesync.server.identity import IdentityStore
from pulsesync.server.privacy.consent import ConsentStore
from pulsesync.server.privacy.export import read_archive, records, write_archive
from pulsesync.server.storage.db import Database
from pulsesync.server.storage.sqlite.consent import SqliteConsentStorage
from pulsesync.server.storage.sqlite.identity import SqliteIdentityStorage
from pulsesync.v1 import common_pb2
from tests.server.privacy.support import database_bytes, search

T0 = 1_767_225_600_000_000


async def _seed(db_path: Path) -> str:
    async with await Database.open(db_path) as db:
        ids = IdentityStore(SqliteIdentityStorage(db), SystemClock())
        uid = await ids.user_id_by_name("zoe")
        code, _ = await ids.create_pairing_code(uid)
        device, _, _ = await ids.pair(code, "ada-phone", common_pb2.DEVICE_KIND_PHONE)
        async with db.transaction() as tx:
            for i in range(5):
                e = search(f"cli-query-{i}", i + 1, T0)
                await tx.execute(
                    "INSERT INTO events (device_pk, seq, user_id, t_us, kind, received_us, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (device.device_pk, i + 1, uid, T0 + i, kind_of(e), T0, e.SerializeToString()),
                )
        return device.device_id


async def _granted(db_path: Path) -> frozenset[int]:
    async with await Database.open(db_path) as db:
        uid = await IdentityStore(SqliteIdentityStorage(db), SystemClock()).user_id_by_name("zoe")
        return await ConsentStore(SqliteConsentStorage(db), SystemClock()).granted(uid)


def test_privacy_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--data-dir", str(tmp_path)]
    assert main(["users", "add", "zoe", *flags]) == 0
    device_id = asyncio.run(_seed(tmp_path / "pulsesync.db"))

    assert main(["privacy", "consent", "zoe", "activity", "grant", *flags]) == 0
    assert main(["privacy", "consent", "zoe", "BEHAVIOR", "grant", *flags]) == 0
    assert main(["privacy", "consent", "zoe", "behavior", "withdraw", *flags]) == 0
    assert asyncio.run(_granted(tmp_path / "pulsesync.db")) == {
        common_pb2.CONSENT_CATEGORY_ACTIVITY
    }
    assert main(["privacy", "consent", "zoe", "location", "grant", *flags]) == 1
    assert "unknown consent category" in capsys.readouterr().err

    assert main(["privacy", "summary", "zoe", "--json", *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    behavior = next(c for c in summary["categories"] if c["category"] == "behavior")
    assert behavior["records"] == 5
    assert behavior["devices"] == [device_id]
    assert summary["consents"] == {
        "behavior": False, "activity": True, "personalization": False, "sync": False,
    }  # fmt: skip
    assert main(["privacy", "summary", "zoe", *flags]) == 0
    assert "behavior" in capsys.readouterr().out

    out = tmp_path / "zoe.zip"
    assert main(["privacy", "export", "zoe", "--out", str(out), *flags]) == 0
    members = read_archive(out)
    assert len(records(members, "events")) == 5
    assert len(records(members, "consent_ledger")) == 3
    assert main(["privacy", "verify-export", str(out)]) == 0
    capsys.readouterr()

    assert main(["privacy", "erase", "zoe", *flags]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["privacy", "erase", "zoe", "--yes", *flags]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["deleted_counts"]["events"] == 5
    assert "zoe" not in json.dumps(receipt)
    blob = database_bytes(tmp_path / "pulsesync.db")
    assert b"cli-query" not in blob
    assert device_id.encode() not in blob
    assert main(["privacy", "summary", "zoe", *flags]) == 1

    assert main(["privacy", "audit", *flags]) == 0
    log = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in log] == [
        "erase", "export", "summary", "summary", "consent", "consent", "consent",
    ]  # fmt: skip
    assert all("zoe" not in line and device_id not in line for line in log)
    assert (tmp_path / "receipt.key").stat().st_mode & 0o777 == 0o600


def test_export_never_writes_over_anything_and_is_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    flags = ["--data-dir", str(data)]
    assert main(["users", "add", "zoe", *flags]) == 0
    asyncio.run(_seed(data / "pulsesync.db"))
    # The data directory itself (it once received the export's files beside the database).
    with pytest.raises(SystemExit, match=r"already exists; an export never writes over anything"):
        main(["privacy", "export", "zoe", "--out", str(data), *flags])
    assert not [p.name for p in data.iterdir() if p.suffix == ".jsonl" or p.suffix == ".json"]
    taken = tmp_path / "taken.zip"
    taken.write_bytes(b"someone's file")
    with pytest.raises(SystemExit, match=r"taken\.zip already exists"):
        main(["privacy", "export", "zoe", "--out", str(taken), *flags])
    assert taken.read_bytes() == b"someone's file"

    # A new .zip, a new directory and an empty directory: written, readable by their owner only.
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "zoe.zip", tmp_path / "zoe-dir", empty):
        assert main(["privacy", "export", "zoe", "--out", str(out), *flags]) == 0
        assert len(records(read_archive(out), "events")) == 5
        files = [out] if out.is_file() else list(out.iterdir())
        assert {p.stat().st_mode & 0o777 for p in files} == {0o600}
        if out.is_dir():
            assert out.stat().st_mode & 0o777 == 0o700
    # No temporary files left beside them.
    assert not [p for p in tmp_path.rglob(".*partial*")]


async def _failing_export() -> AsyncIterator[tuple[str, bytes]]:
    yield "events.jsonl", b"{}\n"
    raise ConnectionError("stream broken")


@pytest.mark.parametrize("name", ["zoe.zip", "zoe-dir"])
async def test_an_export_that_fails_midway_leaves_nothing(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConnectionError):
        await write_archive(_failing_export(), tmp_path / name)
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


def test_verify_export_says_what_is_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "g.zip"
    garbage.write_bytes(b"not a zip")
    assert main(["privacy", "verify-export", str(garbage)]) == 1
    assert (
        "does not verify: neither a .zip export nor a directory export" in capsys.readouterr().err
    )
    assert main(["privacy", "verify-export", str(tmp_path / "none.zip")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["-1", "0", "many"])
def test_audit_limit_must_be_a_whole_number_of_entries(
    tmp_path: Path, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # -1 read as SQLite's "no limit" and failed on PostgreSQL ("LIMIT must not be negative").
    with pytest.raises(SystemExit) as exited:
        main(["privacy", "audit", "--limit", limit, "--data-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "argument --limit" in capsys.readouterr().err
