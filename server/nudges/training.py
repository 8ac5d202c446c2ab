"""The learning loop: logged decisions -> candidate model -> off-policy evaluation -> promotion.

Only decisions of users whose personalization consent is granted *now* are read, so a
withdrawal removes a person from every later model. The estimate is never computed on data
the model that scores it has seen. By default (holdout 0) the candidate is trained on every
decision and evaluated by cross-fitting over people: the people are split into `EVAL_FOLDS`
groups, a model is trained the same way on the other groups, and it scores (outcome model and
policy) the held-out group's decisions; so every decision is used for the estimate, and the
bootstrap resamples people. With holdout > 0 the latest fraction of decisions is kept for
evaluation instead (temporal split).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from pulsesync.server.nudges.catalog import Catalog
from pulsesync.server.nudges.model import LoggedDecision, OutcomeModel, recent_from, train
from pulsesync.server.nudges.ope import (
    Estimate,
    Matrix,
    candidate_matrices,
    check_clip,
    compare,
    current_matrix,
    gate,
    model_matrices,
)
from pulsesync.server.nudges.registry import ModelRegistry, version_name
from pulsesync.server.storage.nudges import NudgeStorage
from pulsesync.v1 import common_pb2, events_pb2

DEFAULT_HOLDOUT: Final = 0.0
# People-groups for the cross-fitted estimate: each fold model sees 3/4 of the people.
EVAL_FOLDS: Final = 4


async def logged_decisions(storage: NudgeStorage, since_us: int = 0) -> list[LoggedDecision]:
    """Decisions with complete outcomes of consenting users (and imported decisions, whose
    people have negative ids), oldest first."""
    rows = await storage.training_rows(
        since_us, events_pb2.NUDGE_ACTION_ACTED, common_pb2.CONSENT_CATEGORY_PERSONALIZATION
    )
    out = []
    for r in rows:
        user_id, at, options, chosen = r.user_id, r.decision_us, r.options_json, r.chosen
        prob, outcome, acted = r.probability, r.outcome_steps, r.acted
        f = json.loads(r.features_json)
        past = f.pop("past_gain", {})
        response = f.pop("past_response", {})
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
                bool(acted),
                response,
            )
        )
    return out


ScoredBy = Literal["holdout", "evaluation_days", "promoted_model"]


@dataclass(frozen=True, slots=True)
class Scored:
    """The decisions an estimate scored, with the candidate's and the current policy's
    probabilities of each action there (rows: decisions; columns: `actions`). What the
    estimate is of: a simulator that knows each decision's expected outcome under every
    action computes its exact value from these."""

    decisions: tuple[LoggedDecision, ...]
    actions: tuple[str, ...]
    candidate: Matrix
    current: Matrix


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A candidate's off-policy estimates against the current policy, and the verdict."""

    version: int
    against: str
    decisions: int
    estimates: dict[str, Estimate]
    better: bool
    reason: str = ""  # the gate's reason for its verdict (ope.gate)
    scored_from_us: int = 0  # the decisions scored were logged from this time on (0: all)
    # What set scored_from_us: "holdout" (the candidate was trained with a holdout),
    # "evaluation_days" (policy.evaluation_days) or "promoted_model" (the current model's
    # training ends later: its own training decisions would flatter it).
    scored_by: ScoredBy = "evaluation_days"
    # The scored decisions and both policies on them (not part of the stored record).
    scored: Scored | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "against": self.against,
            "decisions": self.decisions,
            "better": self.better,
            "reason": self.reason,
            "scored_from_us": self.scored_from_us,
            "scored_by": self.scored_by,
            **{k: v.as_dict() for k, v in self.estimates.items()},
        }


async def train_candidate(
    storage: NudgeStorage,
    catalog: Catalog,
    registry: ModelRegistry,
    holdout: float = DEFAULT_HOLDOUT,
) -> int:
    """Train on the earliest (1 - holdout) decisions; save as a new, unpromoted version."""
    if not 0.0 <= holdout < 1.0:  # nan included
        raise ValueError(f"the holdout must be a fraction in [0, 1), not {holdout:g}")
    decisions = await logged_decisions(storage)
    need = catalog.policy.min_training_decisions
    if len(decisions) < need:
        raise ValueError(
            f"only {len(decisions)} decisions with outcomes; training needs {need} (policy.min_training_decisions)"
        )
    cut = int(len(decisions) * (1 - holdout)) if holdout > 0 else len(decisions)
    if cut < need:
        raise ValueError(
            f"a holdout of {holdout:g} leaves {cut} of {len(decisions)} decisions to train on;"
            f" training needs {need} (policy.min_training_decisions)"
        )
    model = train_model(decisions[:cut], catalog)
    holdout_from = (
        decisions[cut].decision_us if cut < len(decisions) else decisions[-1].decision_us + 1
    )
    return await registry.save(
        model,
        {
            "trained_on": cut,
            "trained_until_us": decisions[-1].decision_us + 1,
            "holdout_from_us": holdout_from if holdout > 0 else None,
            "daily_budget": catalog.policy.daily_budget,
        },
    )


def train_model(decisions: Sequence[LoggedDecision], catalog: Catalog) -> OutcomeModel:
    """A model trained on decisions with the catalog's policy settings (not saved)."""
    p = catalog.policy
    return train(
        decisions,
        catalog.actions,
        "candidate",
        daily_budget=p.daily_budget,
        min_gain=p.min_gain_steps,
        exploration_floor=p.exploration_floor,
        support_sends=p.support_sends,
        steps_types=[t.name for t in catalog.types if t.outcome == "steps_30m"],
    )


def split(decisions: Sequence[LoggedDecision], from_us: int) -> list[LoggedDecision]:
    """The decisions logged at or after from_us."""
    return [d for d in decisions if d.decision_us >= from_us]


def cross_fitted_matrices(
    decisions: Sequence[LoggedDecision],
    catalog: Catalog,
    current: OutcomeModel | None,
    score_from_us: int = 0,
) -> tuple[list[LoggedDecision], Matrix, Matrix, Matrix]:
    """(scored decisions, q, candidate pi, current pi), cross-fitted by people: fold models
    train on every decision of the other people; only decisions at or after score_from_us
    are scored (against a promoted model: those it was not trained on)."""
    scored = split(decisions, score_from_us)
    if len({d.user_id for d in scored}) < EVAL_FOLDS:
        raise ValueError(
            f"cross-fitted evaluation needs decisions of at least {EVAL_FOLDS} people"
            " logged after the current model's training; log more decisions first"
        )
    n = len(scored)
    q = np.zeros((n, len(catalog.actions)))
    pi_new = np.zeros((n, len(catalog.actions)))
    fold_all = [d.user_id % EVAL_FOLDS for d in decisions]
    fold = np.array([d.user_id % EVAL_FOLDS for d in scored])
    for k in range(EVAL_FOLDS):
        part = np.flatnonzero(fold == k)
        if part.size == 0:
            continue
        held = [scored[int(i)] for i in part]
        rest = [d for d, f in zip(decisions, fold_all, strict=True) if f != k]
        q[part], pi_new[part] = candidate_matrices(train_model(rest, catalog), held, catalog.policy)
    pi_cur = current_matrix(current, scored, catalog.actions, catalog.policy)
    return scored, q, pi_new, pi_cur


def cross_fitted(
    decisions: Sequence[LoggedDecision],
    catalog: Catalog,
    current: OutcomeModel | None,
    score_from_us: int = 0,
    clip: float | None = None,
) -> dict[str, Estimate]:
    """Estimates of the training procedure's policy against the current one, cross-fitted by
    people (`cross_fitted_matrices`)."""
    scored, q, pi_new, pi_cur = cross_fitted_matrices(decisions, catalog, current, score_from_us)
    return compare(scored, catalog.actions, q, pi_new, pi_cur, catalog.policy, clip=clip)


async def evaluate_candidate(
    storage: NudgeStorage,
    catalog: Catalog,
    registry: ModelRegistry,
    version: int,
    clip: float | None = None,
) -> Evaluation:
    """Estimate the candidate against the current policy on its held-out decisions
    (importance weights capped at clip when given: ope.estimate)."""
    check_clip(clip)  # before any model is trained
    meta = await registry.meta(version)
    decisions = await logged_decisions(storage)
    current_v = await registry.current()
    current = (
        await registry.load(current_v) if current_v is not None and current_v != version else None
    )
    scored_by: ScoredBy
    if meta.get("holdout_from_us") is not None:
        score_from, scored_by = int(meta["holdout_from_us"]), "holdout"
        held = split(decisions, score_from)
        if not held:
            raise ValueError(f"{version_name(version)} has no held-out decisions with outcomes yet")
        candidate = await registry.load(version)
        actions = tuple(candidate.actions)
        q, pi_new, pi_cur = model_matrices(candidate, current, held, catalog.policy)
    else:
        until = int(meta.get("trained_until_us", 2**62))
        logged = [d for d in decisions if d.decision_us < until]
        # A promoted model's policy scored on its own training decisions looks better than it
        # is (its greedy choices fit those outcomes' noise): score only the decisions logged
        # after its training.
        after_current = (
            int((await registry.meta(current_v)).get("trained_until_us", 0))
            if current is not None and current_v is not None
            else 0
        )
        recent = recent_from(logged, catalog.policy.evaluation_days)
        score_from = max(after_current, recent)
        scored_by = "promoted_model" if after_current > recent else "evaluation_days"
        if len({d.user_id for d in logged}) < EVAL_FOLDS:
            raise ValueError(
                f"cross-fitted evaluation needs decisions of at least {EVAL_FOLDS} people;"
                " train with --holdout 0.25 to evaluate on the latest decisions instead"
            )
        held, q, pi_new, pi_cur = cross_fitted_matrices(logged, catalog, current, score_from)
        actions = tuple(catalog.actions)
    est = compare(held, actions, q, pi_new, pi_cur, catalog.policy, clip=clip)
    promote, reason = gate(est)
    evaluation = Evaluation(
        version,
        version_name(current_v) if current is not None and current_v is not None else "randomized",
        len(held),
        est,
        promote,
        reason,
        score_from,
        scored_by,
        Scored(tuple(held), actions, pi_new, pi_cur),
    )
    await registry.update_meta(version, evaluation=evaluation.as_dict())
    return evaluation


async def promote_if_better(registry: ModelRegistry, evaluation: Evaluation) -> bool:
    """Promote the evaluated version only when the estimate says it is better."""
    if not evaluation.better:
        return False
    await registry.promote(evaluation.version, evaluation.as_dict())
    return True
