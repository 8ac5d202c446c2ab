"""`pulsesync privacy ...`: a person's rights, exercised by an operator on the database.

    pulsesync privacy summary USER
    pulsesync privacy export USER --out FILE.zip|DIR
    pulsesync privacy erase USER --yes
    pulsesync privacy consent USER CATEGORY grant|withdraw
    pulsesync privacy audit [--limit N] [--action A]
    pulsesync privacy purge
    pulsesync privacy verify-export FILE.zip|DIR

The commands work on the database (the SQLite file, or PostgreSQL with --database; no server
needed) and the key vault (--key-vault, a file or a PostgreSQL database, as the server is
given it) through the same code as the PrivacyService RPCs, with the components' exporters and erase hooks registered. A running
server picks up consent changes and erasures made here within seconds. Reads, exports and
erasures are recorded in the audit log as the admin's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pulsesync import kinds
from pulsesync.argtypes import positive_int
from pulsesync.kinds import category_name
from pulsesync.server.cli import (
    _when,
    add_key_flags,
    add_storage_flags,
    config_from,
)
from pulsesync.server.clock import SystemClock
from pulsesync.server.errors import InvalidArgument
from pulsesync.server.privacy.audit import DEFAULT_AUDIT_LIMIT, Action, Actor, AuditLog
from pulsesync.server.privacy.center import PrivacyCenter
from pulsesync.server.privacy.consent import CATEGORIES, CURRENT_POLICY_VERSION
from pulsesync.server.privacy.export import (
    ArchiveExists,
    read_archive,
    verify_archive,
    write_archive,
)
from pulsesync.server.storage.backend import open_storage


def parse_category(text: str) -> int:
    """A ConsentCategory from "behavior", "ACTIVITY" or "CONSENT_CATEGORY_SYNC"."""
    category = kinds.parse_category(text)
    if category is not None:
        return category
    raise InvalidArgument(
        f"unknown consent category {text!r}; use one of "
        + ", ".join(category_name(c) for c in CATEGORIES),
        reason="INVALID_CONSENT_CATEGORY",
    )


@asynccontextmanager
async def offline_center(args: argparse.Namespace) -> AsyncIterator[PrivacyCenter]:
    """The privacy operations over the database, built (not started) by the composition root,
    so every component's erase hooks and exporters take part as they do in the server."""
    from pulsesync.server.compose import build

    config = config_from(args)
    async with open_storage(config.store) as storage:
        parts = await build(config, storage, SystemClock())
        try:
            yield parts.privacy
        finally:
            await parts.close()


async def _user(center: PrivacyCenter, name: str) -> int:
    return await center.identity.user_id_by_name(name)


def _duration_days(us: int | None) -> str:
    return "until erased" if us is None else f"{us // 86_400_000_000} days"


async def cmd_summary(args: argparse.Namespace) -> int:
    async with offline_center(args) as center:
        s = await center.summary(await _user(center, args.user), Actor.ADMIN)
    if args.json:
        print(
            json.dumps(
                {
                    "user": s.user_name,
                    "categories": [
                        {
                            "category": category_name(c.category),
                            "records": c.record_count,
                            "first_us": c.first_us,
                            "last_us": c.last_us,
                            "devices": list(c.device_ids),
                            "retention_us": c.retention_us,
                        }
                        for c in s.categories
                    ],
                    "consents": {category_name(c.category): c.granted for c in s.consents},
                    "nudges_sent": s.nudges_sent,
                    "devices": s.device_count,
                    "last_activity_us": s.last_activity_us,
                    "record_counts": s.record_counts,
                },
                indent=2,
            )
        )
        return 0
    print(f"{s.user_name}: {s.device_count} device(s), last activity {_when(s.last_activity_us)}")
    print(f"{'category':<16}{'consent':<10}{'records':>9}  {'first':<21}{'last':<21}retention")
    granted = {c.category: c for c in s.consents}
    for c in s.categories:
        state = "granted" if granted[c.category].granted else "-"
        print(
            f"{category_name(c.category):<16}{state:<10}{c.record_count:>9}  "
            f"{_when(c.first_us):<21}{_when(c.last_us):<21}{_duration_days(c.retention_us)}"
        )
    print(f"nudges sent: {s.nudges_sent}")
    print("rows held: " + ", ".join(f"{k} {v}" for k, v in sorted(s.record_counts.items()) if v))
    return 0


async def cmd_export(args: argparse.Namespace) -> int:
    async with offline_center(args) as center:
        user_id = await _user(center, args.user)
        try:
            names = await write_archive(center.export(user_id, Actor.ADMIN), args.out)
        except ArchiveExists as e:
            raise SystemExit(f"error: {e}; choose a new path") from None
        except OSError as e:
            raise SystemExit(f"error: cannot write {args.out}: {e.strerror or e}") from None
    manifest = verify_archive(read_archive(args.out))
    total = sum(f["count"] for f in manifest["files"])
    print(f"wrote {args.out}: {len(names) - 1} record files, {total} records, manifest.json")
    return 0


async def cmd_erase(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"error: erasing {args.user!r} deletes all of their data on every device and cannot "
            "be undone; run again with --yes to confirm",
            file=sys.stderr,
        )
        return 2
    async with offline_center(args) as center:
        receipt, report = await center.erase(await _user(center, args.user), Actor.ADMIN)
    print(
        json.dumps(
            {
                "receipt_id": receipt.receipt_id,
                "erase_us": receipt.erase_us,
                "deleted_counts": receipt.deleted_counts,
                "subject_salt": receipt.subject_salt,
                "subject_hash": receipt.subject_hash,
                "signature": receipt.signature,
            },
            indent=2,
        )
    )
    if report is not None:
        print(
            f"database compacted in {report.vacuum_seconds:.3f} s "
            f"({report.db_bytes_before} -> {report.db_bytes_after} bytes)",
            file=sys.stderr,
        )
    return 0


async def cmd_consent(args: argparse.Namespace) -> int:
    category = parse_category(args.category)
    async with offline_center(args) as center:
        user_id = await _user(center, args.user)
        state = await center.consent.set(
            user_id,
            category,
            args.choice == "grant",
            device_id="admin",
            policy_version=args.policy_version,
        )
        person = await center.person(user_id)
        await center.audit.record(
            Action.CONSENT,
            Actor.ADMIN,
            person.pseudonym,
            {"category": category_name(category), "granted": state.granted},
        )
    verb = "granted" if state.granted else "withdrawn"
    print(f"{category_name(category)} {verb} for {args.user} (policy {state.policy_version})")
    return 0


async def cmd_audit(args: argparse.Namespace) -> int:
    config = config_from(args)
    async with open_storage(config.store) as storage:
        entries = await AuditLog(storage.privacy, SystemClock()).entries(
            limit=args.limit, action=args.action
        )
    for e in entries:
        detail: dict[str, Any] = e.detail
        print(
            f"{_when(e.at_us)}  {e.action:<9} by {e.actor:<6} subject {e.subject or '-':<32}  "
            + json.dumps(detail, sort_keys=True)
        )
    return 0


async def cmd_purge(args: argparse.Namespace) -> int:
    async with offline_center(args) as center:
        deleted = await center.purge_expired()
        days = center.policy.raw_event_days
    print(
        f"deleted {deleted['events']} events and {deleted['quarantine']} quarantined "
        f"submissions older than {days} days"
    )
    return 0


async def cmd_verify_export(args: argparse.Namespace) -> int:
    try:
        manifest = verify_archive(read_archive(args.path))
    except OSError as e:
        print(f"error: cannot read {args.path}: {e.strerror or e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as e:
        print(f"error: {args.path} does not verify: {e}", file=sys.stderr)
        return 1
    for f in manifest["files"]:
        print(f"{f['name']:<32}{f['count']:>9} records  sha256 {f['sha256'][:16]}…  ok")
    return 0


def register(sub: Any) -> None:
    """Add the `privacy` command group to the `pulsesync` CLI."""
    group = sub.add_parser(
        "privacy", help="consent, summary, export and erasure of a person's data"
    ).add_subparsers(dest="privacy_cmd", required=True)

    p = group.add_parser("summary", help="what is stored about USER (an audited admin read)")
    p.add_argument("user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_storage_flags(p)
    add_key_flags(p)  # they open profiles (export, erasure)
    p.set_defaults(handler=cmd_summary)

    p = group.add_parser("export", help="write everything about USER to a .zip or a folder")
    p.add_argument("user")
    p.add_argument(
        "--out", type=Path, required=True, help="FILE.zip, or a directory for loose files"
    )
    add_storage_flags(p)
    add_key_flags(p)  # they open profiles (export, erasure)
    p.set_defaults(handler=cmd_export)

    p = group.add_parser("erase", help="delete everything about USER and print the receipt")
    p.add_argument("user")
    p.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    add_storage_flags(p)
    add_key_flags(p)  # they open profiles (export, erasure)
    p.set_defaults(handler=cmd_erase)

    p = group.add_parser("consent", help="grant or withdraw one consent category for USER")
    p.add_argument("user")
    p.add_argument("category", help=", ".join(category_name(c) for c in CATEGORIES))
    p.add_argument("choice", choices=("grant", "withdraw"))
    p.add_argument(
        "--policy-version",
        default=CURRENT_POLICY_VERSION,
        help="the privacy policy version the person agreed to (default %(default)s)",
    )
    add_storage_flags(p)
    add_key_flags(p)  # they open profiles (export, erasure)
    p.set_defaults(handler=cmd_consent)

    p = group.add_parser("audit", help="the privacy audit log, newest first")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_AUDIT_LIMIT,
        help="entries to show (default %(default)s)",
    )
    p.add_argument("--action", choices=[a.value for a in Action], default=None)
    add_storage_flags(p)
    p.set_defaults(handler=cmd_audit)

    p = group.add_parser("purge", help="apply the retention policy now")
    add_storage_flags(p)
    add_key_flags(p)  # they open profiles (export, erasure)
    p.set_defaults(handler=cmd_purge)

    p = group.add_parser("verify-export", help="check an export against its manifest")
    p.add_argument("path", type=Path)
    p.set_defaults(handler=cmd_verify_export)
