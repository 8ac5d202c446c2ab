"""The learning loop: logged decisions -> candidate model -> off-policy evaluation -> promotion.

Only decisions of users whose personalization consent is granted *now* are read, so a
withdrawal removes a person from every later model. A candidate is trained on the earliest
(1 - holdout) of the decisions and evaluated on the rest, so the estimate is never computed
on data the model has seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pulsesync.server.nudges.catalog import Catalog
from pulsesync.server.nudges.model import LoggedDecision, train
from pulsesync.server.nudges.ope import Estimate, better, evaluate_model
from pulsesync.server.nudges.registry import ModelRegistry, version_name
from pulsesync.server.storage.db import Database
from pulsesync.v1 import common_pb2

DEFAULT_HOLDOUT: Final = 0.25

_CONSENTING: Final = (
    "SELECT c.user_id FROM consent_ledger c WHERE c.category = ? AND c.granted = 1 AND c.entry_id ="
    " (SELECT MAX(entry_id) FROM consent_ledger WHERE user_id = c.user_id AND category = c.category)"
)


async def logged_decisions(db: Database, since_us: int = 0) -> list[LoggedDecision]:
    """Decisions with complete outcomes of consenting users, oldest first."""
    async with db.reader.execute(
        "SELECT user_id, decision_us, features, options, chosen, probability, outcome_steps"
        f" FROM nudge_decisions WHERE outcome_complete = 1 AND decision_us >= ? AND user_id IN ({_CONSENTING})"
        " ORDER BY decision_us, decision_id",
        (since_us, common_pb2.CONSENT_CATEGORY_PERSONALIZATION),
    ) as cur:
        rows = await cur.fetchall()
    out = []
    for user_id, at, features, options, chosen, prob, outcome in rows:
        f = json.loads(features)
        past = f.pop("past_gain", {})
        out.append(
            LoggedDecision(
                int(user_id),
                int(at),
                f,
                past,
                json.loads(options),
                chosen,
                float(prob),
                float(outcome),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A candidate's off-policy estimates against the current policy, and the verdict."""

    version: int
    against: str
    decisions: int
    estimates: dict[str, Estimate]
    better: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "against": self.against,
            "decisions": self.decisions,
            "better": self.better,
            **{k: v.as_dict() for k, v in self.estimates.items()},
        }


async def train_candidate(
    db: Database, catalog: Catalog, registry: ModelRegistry, holdout: float = DEFAULT_HOLDOUT
) -> int:
    """Train on the earliest (1 - holdout) decisions; save as a new, unpromoted version."""
    decisions = await logged_decisions(db)
    need = catalog.policy.min_training_decisions
    if len(decisions) < need:
        raise ValueError(
            f"only {len(decisions)} decisions with outcomes; training needs {need} (policy.min_training_decisions)"
        )
    cut = int(len(decisions) * (1 - holdout))
    model = train(decisions[:cut], catalog.actions, "candidate")
    holdout_from = (
        decisions[cut].decision_us if cut < len(decisions) else decisions[-1].decision_us + 1
    )
    return registry.save(model, {"trained_on": cut, "holdout_from_us": holdout_from})


def split(decisions: Sequence[LoggedDecision], from_us: int) -> list[LoggedDecision]:
    return [d for d in decisions if d.decision_us >= from_us]


async def evaluate_candidate(
    db: Database, catalog: Catalog, registry: ModelRegistry, version: int
) -> Evaluation:
    """Estimate the candidate against the current policy on its held-out decisions."""
    meta = registry.meta(version)
    held = split(await logged_decisions(db), int(meta["holdout_from_us"]))
    if not held:
        raise ValueError(f"{version_name(version)} has no held-out decisions with outcomes yet")
    candidate = registry.load(version)
    current_v = registry.current()
    current = registry.load(current_v) if current_v is not None and current_v != version else None
    est = evaluate_model(candidate, current, held, catalog.policy)
    evaluation = Evaluation(
        version,
        version_name(current_v) if current is not None and current_v is not None else "randomized",
        len(held),
        est,
        better(est),
    )
    registry.update_meta(version, evaluation=evaluation.as_dict())
    return evaluation


def promote_if_better(registry: ModelRegistry, evaluation: Evaluation) -> bool:
    """Promote the evaluated version only when the estimate says it is better."""
    if not evaluation.better:
        return False
    registry.promote(evaluation.version, evaluation.as_dict())
    return True
