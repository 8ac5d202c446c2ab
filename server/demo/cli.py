"""`pulsesync demo`: run the demo world with a progress bar, then write the HTML report."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pulsesync.server.demo.report import write_report
from pulsesync.server.demo.world import DemoOptions, DemoResult, DemoWorld
from pulsesync.server.nudges.catalog import load_catalog

STYLES = {
    "nudge": "bold green",
    "feedback": "green",
    "outcome": "bold green",
    "profile": "bold cyan",
    "consent": "bold yellow",
    "privacy": "bold magenta",
    "merge": "dim",
    "timeline": "bold",
    "devices": "bold",
}


def register(sub: Any) -> None:
    """Add `pulsesync demo` to the CLI."""
    p = sub.add_parser(
        "demo",
        help="play a simulated day of one person across phone, desktop and wearable on a real "
        "server on loopback, then write an HTML report",
    )
    p.add_argument("--users", type=int, default=1, help="simulated people (default %(default)s)")
    p.add_argument(
        "--start-hour",
        type=float,
        default=6.0,
        help="time of day the run starts (UTC, default %(default)s)",
    )
    p.add_argument(
        "--hours", type=float, default=18.0, help="simulated hours (default %(default)s)"
    )
    p.add_argument(
        "--wall-seconds",
        type=float,
        default=75.0,
        help="how long the simulation plays in real time (default %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("pulsesync-demo"),
        help="folder for the report and exports (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--nudge-catalog",
        type=Path,
        default=None,
        help="nudge catalog override (TOML) for the server",
    )
    p.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    """Run the demo and print where the report is."""
    try:
        options = DemoOptions(
            users=args.users,
            start_hour=args.start_hour,
            hours=args.hours,
            wall_seconds=args.wall_seconds,
            out_dir=args.out,
            seed=args.seed,
            nudge_catalog=args.nudge_catalog,
        )
        if options.nudge_catalog is not None:
            load_catalog(options.nudge_catalog)  # refused here in one line, not mid-demo
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = await play(options, Console())
    return 0 if result.report is not None else 1


async def play(options: DemoOptions, console: Console) -> DemoResult:
    """Play the world with live output and write the report."""
    # The demo speaks for itself; the components' info logs would drown it.
    logging.getLogger().setLevel(logging.WARNING)
    progress = Progress(
        TextColumn("[bold]simulated"),
        TextColumn("{task.fields[clock]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )

    def say(t_us: int, who: str, text: str) -> None:
        kind = who.rsplit(" ", 1)[-1]
        stamp = datetime.fromtimestamp(t_us / 1e6, UTC).strftime("%H:%M")
        console.print(
            f"[dim]{stamp}[/] [{STYLES.get(kind, '')}]{who:<18}[/] {text}", highlight=False
        )

    world = DemoWorld(options, say)
    console.print(
        f"[bold]PulseSync demo[/]: {options.users} person(s), {options.hours:g} simulated hours "
        f"in about {options.wall_seconds:g} s, a real server on loopback gRPC"
    )
    span = world.end_us - world.start_us
    with progress:
        task = progress.add_task("day", total=span, clock="")

        def advance(t_us: int) -> None:
            clock = datetime.fromtimestamp(t_us / 1e6, UTC).strftime("%a %H:%M")
            progress.update(task, completed=t_us - world.start_us, clock=clock)

        world.progress = advance
        result = await world.run()
    result.report = write_report(result, options.out_dir / "report.html")
    console.print(f"\n[bold]Report:[/] {result.report.resolve()}")
    console.print(
        f"[dim]Exports: {options.out_dir.resolve()}/export-*/ · played in {result.wall_seconds:.0f} s[/]"
    )
    return result
