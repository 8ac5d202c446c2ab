"""`pulsesync-agent`: pair this device, run the agent with a source, show its state.

    pulsesync-agent pair --server HOST:PORT [--server HOST:PORT ...] --code CODE --kind phone|...
    pulsesync-agent run --source simulated-phone|simulated-desktop [--speed N] [--duration S]
    pulsesync-agent status          (with sensors chosen: the Bluetooth adapter's state too)

State (credentials.json, outbox.db) lives in --state-dir (env PULSESYNC_AGENT_STATE_DIR,
default ~/.local/state/pulsesync-agent). Every flag has a PULSESYNC_AGENT_* variable.
Several --server addresses (or a comma list, or a dns:/// name of several replicas) make the
agent move to another replica when one fails (see edge_agent/servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pulsesync.argtypes import key_value, non_negative, positive
from pulsesync.edge_agent.agent import Agent
from pulsesync.edge_agent.client import (
    KIND_NAMES,
    KINDS,
    AgentError,
    Credentials,
    PairingRequired,
    pair,
)
from pulsesync.edge_agent.clock import ScaledClock
from pulsesync.edge_agent.config import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_CAP_S,
    DEFAULT_BATCH_SIZE,
    DEFAULT_UPLINK_LINGER_S,
    AgentSettings,
    StatePaths,
    batch_size,
    default_state_dir,
    env,
    env_or,
)
from pulsesync.edge_agent.consent import StaticConsent
from pulsesync.edge_agent.errors import OutboxFull
from pulsesync.edge_agent.outbox import OutboxError, read_stats
from pulsesync.edge_agent.servers import check_address, join_servers, parse_servers
from pulsesync.edge_agent.sources import SOURCES, SourceOptions, create_source

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

EXIT_ERROR: Final = 1
# Distinct so that scripts and supervisors can tell "pair again" from other failures.
EXIT_PAIR_AGAIN: Final = 3
# Without --duration, an accelerated run starts this many real seconds' worth of simulated
# time in the past, then runs at real speed: device times never lie in the future.
_CATCH_UP_S: Final = 600.0
# On SIGTERM/SIGINT the agent tries this long to hand the last events to the server; what
# is left stays in the outbox for the next run.
SHUTDOWN_DRAIN_S: Final = 2.0
DEFAULT_SERVER: Final = "127.0.0.1:50051"

log = logging.getLogger("pulsesync.edge_agent")


def _when(us: int) -> str:
    if not us:
        return "never"
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One running agent per state directory (the kernel drops the lock if the process dies)."""
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(
                f"another pulsesync-agent is running with state dir {lock_file.parent}; "
                "stop it first or use another --state-dir"
            ) from None
        yield


# -- pair -----------------------------------------------------------------------------------
async def cmd_pair(args: argparse.Namespace) -> int:
    paths = StatePaths(args.state_dir)
    paths.ensure()
    creds = await pair(
        _servers(args.server) or parse_servers(DEFAULT_SERVER),
        args.code,
        KINDS[args.kind],
        args.name or f"{socket.gethostname()} ({args.kind})",
        tls_root_cert=args.tls_root_cert.absolute() if args.tls_root_cert else None,
        tls_client_cert=args.tls_client_cert.absolute() if args.tls_client_cert else None,
        tls_client_key=args.tls_client_key.absolute() if args.tls_client_key else None,
    )
    creds.save(paths.credentials)
    print(f"paired as device {creds.device_id} ({creds.device_name}) of {creds.user_name!r}")
    print(f"credentials saved to {paths.credentials}")
    print("next: pulsesync-agent run --source simulated-phone")
    return 0


# -- run ------------------------------------------------------------------------------------
def _servers(values: list[str] | None) -> tuple[str, ...]:
    """The addresses given by --server (repeated, comma lists) or PULSESYNC_AGENT_SERVER."""
    servers = parse_servers(values) if values else parse_servers(env_or("SERVER", ""))
    return tuple(check_address(s) for s in servers)


def _settings(args: argparse.Namespace) -> AgentSettings:
    return AgentSettings(
        batch_size=args.batch_size,
        uplink_linger_s=args.linger_ms / 1000,
        backoff_cap_s=args.backoff_cap,
        backoff_base_s=min(DEFAULT_BACKOFF_BASE_S, args.backoff_cap),
    )


def _progress(agent: Agent, started: float) -> str:
    t = agent.tracker.stats()
    parts = [
        f"[{time.monotonic() - started:6.1f}s]",
        f"recorded={t.recorded}",
        f"in_outbox={t.written}",
    ]
    if agent.uplink is not None:
        u = agent.uplink.stats()
        parts += [
            f"acked_through={u.acked_through}",
            f"batch={u.batch_size}",
            f"reconnects={u.reconnects}",
            f"server={u.server}",
            "connected" if u.connected else f"offline ({u.last_error or 'connecting'})",
        ]
    if t.dropped_no_consent:
        parts.append(f"no_consent={t.dropped_no_consent}")
    return " ".join(parts)


async def _print_progress(agent: Agent, started: float, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        print(_progress(agent, started), flush=True)


async def _run_for(work: Coroutine[Any, Any, None], seconds: float | None) -> None:
    """Run work, stopping it after `seconds` of real time (None: until it ends)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await work


async def cmd_run(args: argparse.Namespace) -> int:
    paths = StatePaths(args.state_dir)
    paths.ensure()
    creds = Credentials.load(paths.credentials)
    if servers := _servers(args.server):
        # Replicas added or moved since pairing: the token stays valid on all of them.
        creds = dataclasses.replace(creds, server=join_servers(servers))
    speed = float(args.speed)
    clock = ScaledClock(
        speed, time.time_ns() // 1000 - int((speed - 1) * (args.duration or _CATCH_UP_S) * 1e6)
    )
    extra = dict(args.source_option)
    source = create_source(
        args.source,
        SourceOptions(
            seed=args.seed,
            clock=clock,
            duration_s=None,  # the run ends by the wall clock (below), not simulated time
            extra=extra,
        ),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    with _exclusive(paths.lock):
        # Consent is granted explicitly here (the Tracker denies by default); the server still
        # checks each category before storing, so nothing ungranted there is kept.
        agent = Agent(
            paths.outbox, creds, consent=StaticConsent(), settings=_settings(args), clock=clock
        )
        try:
            async with agent:
                print(
                    f"device {creds.device_id} -> {creds.server}: source {args.source} "
                    f"(seed {args.seed}, speed {speed:g}x); outbox {paths.outbox}",
                    flush=True,
                )
                uplink = agent.uplink_task
                assert uplink is not None
                source_task = asyncio.create_task(
                    _run_for(source.run(agent.tracker), args.duration), name="source"
                )
                stopper = asyncio.create_task(stop.wait())
                progress = asyncio.create_task(_print_progress(agent, started, args.progress))
                try:
                    await asyncio.wait(
                        {source_task, stopper, uplink}, return_when="FIRST_COMPLETED"
                    )
                    if uplink.done():
                        uplink.result()  # raises PairingRequired / AgentError
                    if source_task.done():
                        source_task.result()
                        print("source finished; sending what is left", flush=True)
                        drain = asyncio.create_task(agent.drain(args.drain_timeout))
                        await asyncio.wait({drain, stopper}, return_when="FIRST_COMPLETED")
                        drained = drain.done() and drain.result()
                        drain.cancel()
                    else:
                        source_task.cancel()
                        print("stopping: flushing to the outbox", flush=True)
                        drained = await agent.drain(SHUTDOWN_DRAIN_S)
                finally:
                    for task in (source_task, stopper, progress):
                        task.cancel()
                depth = await agent.outbox.count()
                print(_progress(agent, started), flush=True)
                if drained:
                    print("done: every event is acknowledged by the server", flush=True)
                else:
                    print(f"stopped with {depth} events in the outbox; the next run sends them")
        except OutboxFull:
            # Said here, not by the error itself, which speaks to a running agent ("kept in
            # memory meanwhile"): once the process ends, that queue is gone.
            print(
                f"error: the disk holding {paths.outbox} is full: events recorded in this run "
                "that were not yet written to the outbox are lost with this stop (those already "
                "in it are kept and sent by the next run). Free space on the device and start "
                "the agent again.",
                file=sys.stderr,
            )
            return EXIT_ERROR
    return 0


# -- status ---------------------------------------------------------------------------------
async def cmd_status(args: argparse.Namespace) -> int:
    paths = StatePaths(args.state_dir)
    if paths.credentials.exists():
        c = Credentials.load(paths.credentials)
        kind = KIND_NAMES.get(c.kind, "?")
        print(f"paired:        device {c.device_id} ({c.device_name}, {kind}) of {c.user_name!r}")
        print(f"server:        {c.server}{' (TLS)' if c.tls_root_cert else ''}")
    else:
        print("paired:        no (run `pulsesync-agent pair ...`)")
    if paths.outbox.exists():
        s = read_stats(paths.outbox)
        print(f"outbox:        {s.depth} events waiting ({paths.outbox})")
        print(f"last seq:      {s.last_seq}")
        print(f"acked through: {s.acked_through} (last ack {_when(s.last_ack_us)})")
    else:
        print("outbox:        none yet")
    await _wearable_status(args.state_dir)
    return 0


async def _wearable_status(state_dir: Path) -> None:
    """For a wearable bridge (sensors chosen): the sensors, and whether Bluetooth is usable,
    since without it `run --source wearable` stops at once."""
    from pulsesync.edge_agent.ble.sensors import SensorStore

    chosen = SensorStore(state_dir).list()
    if not chosen:
        return
    print(f"sensors:       {', '.join(s.address for s in chosen)}")
    # bleak (and D-Bus) load only for a wearable setup.
    from pulsesync.edge_agent.ble.scanner import probe_adapter

    print(f"bluetooth:     {(await probe_adapter()).line()}")


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pulsesync-agent", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="credentials and outbox (env PULSESYNC_AGENT_STATE_DIR; default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default=env_or("LOG_LEVEL", "warning"), help="debug, info, warning"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pair", help="pair this device with a server using a pairing code")
    p.add_argument(
        "--server",
        action="append",
        help="HOST:PORT, dns:///NAME:PORT, or a comma list; repeat for several replicas "
        f"(env PULSESYNC_AGENT_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument("--code", required=True, help="from `pulsesync devices pair-code USER`")
    p.add_argument("--kind", choices=sorted(KINDS), required=True)
    p.add_argument("--name", default=env_or("NAME", ""), help="device name (default: host name)")
    p.add_argument(
        "--tls-root-cert",
        type=Path,
        default=Path(v) if (v := env("TLS_ROOT_CERT")) else None,
        help="PEM root certificate to trust (enables TLS)",
    )
    p.add_argument(
        "--tls-client-cert",
        type=Path,
        default=Path(v) if (v := env("TLS_CLIENT_CERT")) else None,
        help="PEM certificate this device presents, for a server that requires mutual TLS",
    )
    p.add_argument(
        "--tls-client-key",
        type=Path,
        default=Path(v) if (v := env("TLS_CLIENT_KEY")) else None,
        help="PEM private key of --tls-client-cert (mode 0600)",
    )
    p.set_defaults(handler=cmd_pair)

    p = sub.add_parser("run", help="run the agent with an event source until stopped")
    p.add_argument(
        "--source", choices=sorted(SOURCES), default=env("SOURCE"), required=not env("SOURCE")
    )
    # Defaults from the environment stay strings: argparse parses them with `type` like a flag,
    # so a bad PULSESYNC_AGENT_* value is a usage error naming the option, not a traceback.
    p.add_argument("--speed", type=positive, default=env_or("SPEED", "1"),
                   help="simulated seconds per real second (default %(default)s)")  # fmt: skip
    p.add_argument("--duration", type=positive, default=None,
                   help="stop the source after this many real seconds (default: run until stopped)")  # fmt: skip
    p.add_argument("--seed", type=int, default=env_or("SEED", "0"))
    p.add_argument(
        "--server",
        action="append",
        help="use these server addresses instead of those saved at pairing (repeatable; "
        "env PULSESYNC_AGENT_SERVER)",
    )
    p.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="source-specific setting (repeatable)")  # fmt: skip
    p.add_argument(
        "--batch-size", type=batch_size, default=env_or("BATCH_SIZE", str(DEFAULT_BATCH_SIZE))
    )
    p.add_argument("--linger-ms", type=non_negative,
                   default=env_or("LINGER_MS", str(DEFAULT_UPLINK_LINGER_S * 1000)))  # fmt: skip
    p.add_argument("--backoff-cap", type=positive,
                   default=env_or("BACKOFF_CAP_S", str(DEFAULT_BACKOFF_CAP_S)),
                   help="longest wait between reconnects, seconds (default %(default)s)")  # fmt: skip
    p.add_argument("--drain-timeout", type=non_negative, default=env_or("DRAIN_TIMEOUT_S", "30"),
                   help="after the source ends, wait this long for every ack (default %(default)s)")  # fmt: skip
    p.add_argument("--progress", type=positive, default=env_or("PROGRESS_S", "2"),
                   help="print progress every this many seconds")  # fmt: skip
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("status", help="show pairing and outbox state")
    p.set_defaults(handler=cmd_status)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Command groups contributed by agent components (e.g. BLE `scan`): register(subparsers)."""
    from pulsesync.edge_agent.ble.cli import register as ble

    return [ble]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pulsesync-agent`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        handler: Handler = args.handler
        return asyncio.run(handler(args))
    except PairingRequired as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PAIR_AGAIN
    except (AgentError, OutboxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
