"""`pulsesync nudges train|evaluate|promote|status`: the learning loop from the command line.

    pulsesync nudges train              # new candidate version from logged decisions
    pulsesync nudges evaluate [-v N]    # IPS / SNIPS / DR / NET with 95% CIs against the current policy
    pulsesync nudges promote [-v N]     # promote only if the net gain's CI is above zero
    pulsesync nudges status             # versions, the promoted one, logged decisions
    pulsesync nudges import-log FILE    # add decisions logged elsewhere (CSV or JSON Lines)

They work on the database (the SQLite file, or PostgreSQL with --database postgresql://...),
which keeps the logged decisions and the model registry alike; every running server over it
(every replica) loads a promoted model at its next decision tick. A model folder of an earlier
release (DATA_DIR/nudge_models, or --models) is imported into the database first, once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pulsesync.server.nudges.catalog import Catalog, load_catalog
from pulsesync.server.nudges.registry import (
    MODEL_FOLDER,
    ModelNotFound,
    ModelRegistry,
    version_name,
)
from pulsesync.server.nudges.training import (
    DEFAULT_HOLDOUT,
    evaluate_candidate,
    logged_decisions,
    promote_if_better,
    train_candidate,
)
from pulsesync.server.storage.backend import Storage, open_storage
from pulsesync.timeutil import US_PER_S


@asynccontextmanager
async def _opened(args: argparse.Namespace) -> AsyncIterator[tuple[Storage, ModelRegistry]]:
    """The database (a SQLite file or PostgreSQL) and the model registry in it, with an earlier
    release's model folder imported first."""
    from pulsesync.server.cli import config_from

    config = config_from(args)
    async with open_storage(config.store) as storage:
        registry = ModelRegistry(storage.models)
        await registry.import_folder(args.models or config.data_dir / MODEL_FOLDER)
        try:
            yield storage, registry
        except ModelNotFound as e:
            raise SystemExit(str(e)) from None


def _catalog(args: argparse.Namespace) -> Catalog:
    """--catalog, else the configured one (PULSESYNC_NUDGE_CATALOG), else the defaults."""
    from pulsesync.server.cli import config_from

    try:
        return load_catalog(args.catalog or config_from(args).nudges.catalog)
    except ValueError as e:
        raise SystemExit(str(e)) from None


async def _latest(registry: ModelRegistry, version: int | None) -> int:
    if version is not None:
        return version
    versions = await registry.versions()
    if not versions:
        raise SystemExit("no model versions yet: run `pulsesync nudges train` first")
    return versions[-1]


async def cmd_train(args: argparse.Namespace) -> int:
    async with _opened(args) as (storage, registry):
        try:
            version = await train_candidate(storage.nudges, _catalog(args), registry, args.holdout)
        except ValueError as e:
            raise SystemExit(f"cannot train: {e}") from None
        meta = await registry.meta(version)
    print(f"saved {version_name(version)} (trained on {meta['trained_on']} decisions)")
    print(f"next: pulsesync nudges evaluate --version {version}")
    return 0


async def cmd_evaluate(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    async with _opened(args) as (storage, registry):
        version = await _latest(registry, args.version)
        try:
            ev = await evaluate_candidate(storage.nudges, catalog, registry, version, args.clip)
        except ValueError as e:
            raise SystemExit(f"cannot evaluate: {e}") from None
    print(
        f"{version_name(version)} vs {ev.against} on {ev.decisions} held-out decisions (steps in 30 min):"
    )
    if ev.scored_from_us:
        since = datetime.fromtimestamp(ev.scored_from_us / US_PER_S, UTC)
        why = {
            "holdout": "the candidate's holdout: it was trained on the decisions before",
            "evaluation_days": f"policy.evaluation_days = {catalog.policy.evaluation_days:g};"
            " the earlier ones train the models only",
            "promoted_model": "after the promoted model's training: its own training decisions"
            " would flatter it; the earlier ones train the models only",
        }[ev.scored_by]
        print(f"  scored: the decisions logged from {since:%Y-%m-%d %H:%M} UTC on ({why})")
    for name in ("ips", "snips", "dr", "net"):
        new, base, diff = (
            ev.estimates[name],
            ev.estimates[f"{name}_baseline"],
            ev.estimates[f"{name}_diff"],
        )
        print(
            f"  {name.upper():<5} new {new.value:8.1f} [{new.low:.1f}, {new.high:.1f}]"
            f"  current {base.value:8.1f}  gain {diff.value:+7.1f} [{diff.low:+.1f}, {diff.high:+.1f}]"
        )
    cost = catalog.policy.min_gain_steps
    print(
        f"  (NET: DR less {cost:g} steps per nudge sent, the policy's objective; the gate uses it)"
    )
    if args.clip is not None:
        print(
            f"  (importance weights capped at {args.clip:g}: less variance, a bias towards the log)"
        )
    support = ev.estimates.get("support")
    if support is not None:
        print(f"  support: {support.value:.0%} of the candidate's choices are on logged actions")
    ess = ev.estimates.get("effective_decisions")
    if ess is not None:
        print(
            f"  effective decisions: {ess.value:.0f} of {ev.decisions} (importance weights;"
            " a small share means a few decisions decide the estimate)"
        )
    print(
        "verdict: better (promotable)"
        if ev.better
        else "verdict: not shown to be better; keep the current policy"
    )
    if ev.reason:
        print(f"gate: {ev.reason}")
    return 0


async def cmd_promote(args: argparse.Namespace) -> int:
    async with _opened(args) as (_, registry):
        version = await _latest(registry, args.version)
        evaluation: dict[str, Any] | None = (await registry.meta(version)).get("evaluation")
        if evaluation is None:
            raise SystemExit(
                f"{version_name(version)} has not been evaluated: run `pulsesync nudges evaluate -v {version}`"
            )
        promoted = await _promote(registry, version, evaluation)
    if not promoted:
        return 2
    print(f"promoted {version_name(version)}; running servers load it at their next tick")
    return 0


async def _promote(registry: ModelRegistry, version: int, evaluation: dict[str, Any]) -> bool:
    """Promote version on its stored evaluation if the gate passed it; whether promoted."""
    from pulsesync.server.nudges.ope import Estimate
    from pulsesync.server.nudges.training import Evaluation

    est = {
        k: Estimate(v["value"], v["low"], v["high"])
        for k, v in evaluation.items()
        if isinstance(v, dict)
    }
    ev = Evaluation(
        version,
        evaluation["against"],
        evaluation["decisions"],
        est,
        bool(evaluation["better"]),
        str(evaluation.get("reason", "")),
    )
    if not await promote_if_better(registry, ev):
        print(
            f"not promoted: the estimate does not show {version_name(version)} is better than {ev.against}"
        )
        if ev.reason:
            print(f"gate: {ev.reason}")
        return False
    return True


async def cmd_import_log(args: argparse.Namespace) -> int:
    from pulsesync.server.nudges.importlog import LogFormatError, import_file

    catalog = _catalog(args)
    async with _opened(args) as (storage, _):
        try:
            summary = await import_file(storage.nudges, args.file, catalog.actions)
        except LogFormatError as e:
            raise SystemExit(f"cannot import {args.file}: {e}") from None
        except OSError as e:
            raise SystemExit(f"cannot read {args.file}: {e.strerror}") from None
    print(
        f"imported {summary.stored} decisions of {summary.people} people from {args.file.name}"
        f" ({summary.unavailable} unavailable rows skipped, {summary.rows} rows read)"
    )
    print("next: pulsesync nudges train")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with _opened(args) as (storage, registry):
        current = await registry.current()
        versions = await registry.versions()
        metas = [await registry.meta(v) for v in versions]
        decisions = await logged_decisions(storage.nudges)
    print(f"promoted: {version_name(current) if current else 'none (randomized cold start)'}")
    for v, meta in zip(versions, metas, strict=True):
        ev = meta.get("evaluation") or {}
        # Evaluations made before the net estimate existed have the DR gain only.
        label, gain = (
            ("net gain", ev.get("net_diff")) if "net_diff" in ev else ("DR gain", ev.get("dr_diff"))
        )
        verdict = (
            f"{label} {gain['value']:+.1f} [{gain['low']:+.1f}, {gain['high']:+.1f}]"
            if gain
            else "not evaluated"
        )
        print(f"  {version_name(v)}  trained on {meta.get('trained_on', '?')} decisions  {verdict}")
    print(f"decisions with outcomes (consenting users): {len(decisions)}")
    if args.json:
        print(json.dumps({"current": current, "versions": versions, "decisions": len(decisions)}))
    return 0


def register(sub: Any) -> None:
    """Add the `nudges` command group to the pulsesync CLI."""
    from pulsesync.argtypes import positive_int
    from pulsesync.server.cli import add_storage_flags

    group = sub.add_parser(
        "nudges", help="train, evaluate and promote the nudge policy"
    ).add_subparsers(dest="nudges_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_storage_flags(p)
        p.add_argument(
            "--models",
            type=Path,
            default=None,
            help="an earlier release's model folder, imported into the database once"
            " (default DATA_DIR/nudge_models)",
        )
        p.add_argument(
            "--catalog", type=Path, default=None, help="nudge catalog TOML overriding the defaults"
        )

    p = group.add_parser("train", help="train a candidate model from logged decisions")
    common(p)
    p.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="latest fraction kept for evaluation (default 0: cross-fitted over people)",
    )
    p.set_defaults(handler=cmd_train)
    for name, fn, helptext in (
        (
            "evaluate",
            cmd_evaluate,
            "off-policy estimates of a candidate against the current policy",
        ),
        ("promote", cmd_promote, "promote an evaluated candidate if it is estimated better"),
    ):
        p = group.add_parser(name, help=helptext)
        common(p)
        p.add_argument(
            "-v",
            "--version",
            type=positive_int,
            default=None,
            help="model version (default: latest)",
        )
        p.set_defaults(handler=fn)
        if name == "evaluate":
            p.add_argument(
                "--clip",
                type=float,
                default=None,
                metavar="M",
                help="cap every importance weight at M (>= 1), for logs where a few tiny"
                " logged probabilities dominate the estimate (default: no cap)",
            )
    p = group.add_parser("status", help="model versions, the promoted one, logged decisions")
    common(p)
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(handler=cmd_status)
    p = group.add_parser(
        "import-log",
        help="import logged decisions (pulsesync-decisions/1, CSV or JSON Lines) for training",
    )
    common(p)
    p.add_argument("file", type=Path, help="the decision log (docs/nudges.md: import format)")
    p.set_defaults(handler=cmd_import_log)
