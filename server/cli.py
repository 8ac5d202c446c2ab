"""`pulsesync`: run the server and administer it.

    pulsesync serve [--host H] [--port P] [--db FILE | --database URL]
                    [--tls-cert C --tls-key K [--tls-client-ca CA]] [--insecure]
    pulsesync users add NAME | users list
    pulsesync devices pair-code USER | devices list USER | devices revoke USER DEVICE_ID

Admin commands work on the database directly (no server needed), so the first user can be
created before anything runs; --database names a SQLite file or a postgresql:// URL. Every flag has a PULSESYNC_* environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import os
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pulsesync.server.clock import SystemClock
from pulsesync.server.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerConfig,
    env,
    load_config,
)
from pulsesync.server.errors import PulseSyncError
from pulsesync.server.identity import IdentityStore, parse_duration_s
from pulsesync.server.logs import setup_logging
from pulsesync.server.storage.backend import open_storage
from pulsesync.server.storage.database_url import (
    add_database_option,
    argument_type,
    parse_key_vault,
    parse_read_database,
)
from pulsesync.server.storage.errors import DatabaseUnavailable
from pulsesync.v1 import common_pb2

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _when(us: int | None) -> str:
    if us is None:
        return "-"
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    """--data-dir and --db, shared by every command that opens the database."""
    p.add_argument(
        "--data-dir",
        dest="data_dir",
        type=Path,
        help="where the database and key file live (env PULSESYNC_DATA_DIR; "
        f"default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--db",
        dest="db_path",
        type=Path,
        help="the SQLite database file (env PULSESYNC_DB; default DATA_DIR/pulsesync.db)",
    )
    add_database_option(p)


def add_key_flags(p: argparse.ArgumentParser) -> None:
    """--key-file and --key-vault, for the commands that open profiles."""
    p.add_argument(
        "--key-file",
        dest="key_file",
        type=Path,
        help="profile key-encryption key file (env PULSESYNC_KEY_FILE; default DATA_DIR/kek.key)",
    )
    p.add_argument(
        "--key-vault",
        dest="key_vault",
        type=argument_type(parse_key_vault),
        metavar="FILE_OR_URL",
        help="profile data key vault, a SQLite file or a postgresql:// database of its own: "
        "back it up apart from the database, with short retention (env PULSESYNC_KEY_VAULT; "
        "default DATA_DIR/keyvault.db)",
    )


def config_from(args: argparse.Namespace) -> ServerConfig:
    """The command's configuration: its flags, then PULSESYNC_* variables, then defaults.
    Flags are defined with `dest` set to the setting's field and no default (see SETTINGS)."""
    flags = vars(args)
    if flags.get("database") is not None:  # add_database_option's value (a DatabaseUrl)
        flags = {**flags, "database_url": flags["database"]}
    try:
        return load_config(flags)
    except ValueError as e:
        raise SystemExit(str(e)) from None


async def _with_identity(
    args: argparse.Namespace, fn: Callable[[IdentityStore], Awaitable[int]]
) -> int:
    async with open_storage(config_from(args).store) as storage:
        return await fn(IdentityStore(storage.identity, SystemClock()))


# -- serve --------------------------------------------------------------------------------
async def cmd_serve(args: argparse.Namespace) -> int:
    from pulsesync.server.app import serve_forever

    await serve_forever(config_from(args))
    return 0


# -- users --------------------------------------------------------------------------------
async def cmd_users_add(args: argparse.Namespace) -> int:
    async def run(ids: IdentityStore) -> int:
        user_id = await ids.add_user(args.name)
        print(f"created user {args.name!r} (id {user_id})")
        print(f"next: pulsesync devices pair-code {args.name}")
        return 0

    return await _with_identity(args, run)


async def cmd_users_list(args: argparse.Namespace) -> int:
    async def run(ids: IdentityStore) -> int:
        for user_id, name, created in await ids.list_users():
            print(f"{user_id:>5}  {_shown(name):<30} created {_when(created)}")
        return 0

    return await _with_identity(args, run)


# -- devices ------------------------------------------------------------------------------
async def cmd_pair_code(args: argparse.Namespace) -> int:
    async def run(ids: IdentityStore) -> int:
        user_id = await ids.user_id_by_name(args.user)
        code, expire = await ids.create_pairing_code(user_id)
        print(code)
        print(
            f"single use, valid until {_when(expire)}; on the device run:\n"
            f"  pulsesync-agent pair --code {code} --kind phone|desktop|wearable",
            file=sys.stderr,
        )
        return 0

    return await _with_identity(args, run)


def _shown(name: str) -> str:
    """A stored name as printed: control characters escaped (names stored before they were
    refused must not reach the terminal as escapes)."""
    return "".join(
        ch.encode("unicode_escape").decode() if unicodedata.category(ch) == "Cc" else ch
        for ch in name
    )


async def cmd_devices_list(args: argparse.Namespace) -> int:
    async def run(ids: IdentityStore) -> int:
        user_id = await ids.user_id_by_name(args.user)
        for d in await ids.list_devices(user_id):
            kind = common_pb2.DeviceKind.Name(d.kind).removeprefix("DEVICE_KIND_").lower()  # type: ignore[arg-type]
            state = f"revoked {_when(d.revoke_us)}" if d.revoke_us else "active"
            print(
                f"{d.device_id}  {kind:<16} {_shown(d.name):<24} last seen {_when(d.last_seen_us)}"
                f"  {state}"
            )
        return 0

    return await _with_identity(args, run)


async def cmd_devices_revoke(args: argparse.Namespace) -> int:
    async def run(ids: IdentityStore) -> int:
        user_id = await ids.user_id_by_name(args.user)
        d = await ids.revoke(user_id, args.device_id)
        print(
            f"revoked {d.device_id} ({_shown(d.name)}); a running server cuts its streams within"
            " seconds"
        )
        return 0

    return await _with_identity(args, run)


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pulsesync", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--log-level", default=env("LOG_LEVEL", "info"), help="debug, info, warning"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--host", dest="host", help=f"address to bind (env PULSESYNC_HOST; default {DEFAULT_HOST})"
    )
    serve.add_argument(
        "--port",
        dest="port",
        type=int,
        help=f"port (0 = any free; env PULSESYNC_PORT; default {DEFAULT_PORT})",
    )
    add_storage_flags(serve)
    serve.add_argument(
        "--read-database",
        dest="read_database",
        type=argument_type(parse_read_database),
        metavar="URL",
        help="a PostgreSQL hot standby of --database that TimelineService reads (ListEvents, "
        "SummarizeActivity, ListEventChanges) are served from; they may lag it by the "
        "standby's replay delay (env PULSESYNC_READ_DATABASE; docs/scaling.md)",
    )
    serve.add_argument(
        "--tls-cert",
        dest="tls_cert",
        type=Path,
        help="PEM certificate chain (env PULSESYNC_TLS_CERT)",
    )
    serve.add_argument(
        "--tls-key", dest="tls_key", type=Path, help="PEM private key (env PULSESYNC_TLS_KEY)"
    )
    serve.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca",
        type=Path,
        help="require mutual TLS: devices must present a certificate signed by this PEM CA "
        "(env PULSESYNC_TLS_CLIENT_CA)",
    )
    serve.add_argument(
        "--insecure",
        dest="insecure",
        action="store_true",
        default=None,
        help="allow plaintext on a non-loopback --host (tokens cross the network in the "
        "clear; env PULSESYNC_INSECURE=1)",
    )
    serve.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="serve Prometheus metrics on this port (env PULSESYNC_METRICS_PORT)",
    )
    serve.add_argument(
        "--push-webhook-url",
        dest="nudges.push_url",
        help="POST nudges for devices without an open stream to this push gateway (env "
        "PULSESYNC_PUSH_WEBHOOK_URL); the HMAC secret comes from PULSESYNC_PUSH_WEBHOOK_SECRET "
        "(never a flag)",
    )
    add_key_flags(serve)
    serve.add_argument(
        "--port-file", dest="port_file", type=Path, help="write the bound port here once listening"
    )
    serve.add_argument(
        "--max-token-age",
        dest="max_token_age_s",
        type=parse_duration_s,
        metavar="DURATION",
        help="refuse device tokens older than this (e.g. 90d, 12h, 3600s) with TOKEN_EXPIRED; "
        "agents rotate theirs well before (env PULSESYNC_MAX_TOKEN_AGE; default: no limit)",
    )
    serve.set_defaults(handler=cmd_serve)

    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_cmd", required=True
    )
    p = users.add_parser("add", help="create a user")
    p.add_argument("name")
    add_storage_flags(p)
    p.set_defaults(handler=cmd_users_add)
    p = users.add_parser("list", help="list users")
    add_storage_flags(p)
    p.set_defaults(handler=cmd_users_list)

    devices = sub.add_parser("devices", help="pair and manage devices").add_subparsers(
        dest="devices_cmd", required=True
    )
    p = devices.add_parser(
        "pair-code", help="mint a single-use pairing code for USER (valid 10 minutes)"
    )
    p.add_argument("user")
    add_storage_flags(p)
    p.set_defaults(handler=cmd_pair_code)
    p = devices.add_parser("list", help="list USER's devices")
    p.add_argument("user")
    add_storage_flags(p)
    p.set_defaults(handler=cmd_devices_list)
    p = devices.add_parser("revoke", help="revoke one of USER's devices")
    p.add_argument("user")
    p.add_argument("device_id")
    add_storage_flags(p)
    p.set_defaults(handler=cmd_devices_revoke)

    for register in _extra_commands(load):
        register(sub)
    return parser


# Command groups contributed by the server's components. Their modules import what the command
# needs (the demo: rich, matplotlib and the whole server; nudges: LightGBM), so only the group
# named on the command line is imported; `pulsesync --help` lists the others by name.
_EXTRA_COMMANDS: Final = {
    "demo": (
        "pulsesync.server.demo.cli",
        "play a simulated day of one person across phone, desktop and wearable on a real "
        "server on loopback, then write an HTML report",
    ),
    "nudges": ("pulsesync.server.nudges.cli", "train, evaluate and promote the nudge policy"),
    "keys": ("pulsesync.server.profiles.cli", "manage the profile encryption keys"),
    "privacy": (
        "pulsesync.server.privacy.cli",
        "consent, summary, export and erasure of a person's data",
    ),
    "db": ("pulsesync.server.storage.cli", "the database's schema (SQLite or PostgreSQL)"),
}


def _extra_commands(load: Iterable[str] | None = None) -> list[Callable[[Any], None]]:
    """Command groups contributed by the server's components (keys, privacy, nudges, demo);
    those not in `load` (all when None) are registered by name and help only."""
    registers: list[Callable[[Any], None]] = []
    for name, (module, helptext) in _EXTRA_COMMANDS.items():
        if load is None or name in load:
            registers.append(importlib.import_module(module).register)
        else:
            registers.append(functools.partial(_placeholder, name, helptext))
    return registers


def _placeholder(name: str, helptext: str, sub: Any) -> None:
    sub.add_parser(name, help=helptext)


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is not an option or an option's value)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    args = build_parser(load=() if command is None else (command,)).parse_args(argv)
    setup_logging(args.log_level, json_lines=args.command == "serve")
    try:
        handler: Handler = args.handler
        return asyncio.run(handler(args))
    except PulseSyncError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except DatabaseUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
