"""The outcome model: LightGBM predicts steps in the next 30 minutes for each candidate action.

Two boosters make one prediction, q(x, a) = base(x) + effect(x, a), with effect(x, none) = 0:
* `base` predicts the outcome when nothing is sent, from the context alone (fitted on the
  decisions where nothing was sent: the pre-decision steps, time of day and routine explain
  much of the 30-minute outcome);
* `effect` predicts what a nudge of each type adds over sending nothing, one booster per type
  (a single booster with the type as an input column was measured to hardly ever split on it:
  the types' learned effects came out within a few steps of each other in every context, while
  their logged outcomes differed by tens of steps). With HeartSteps-sized
  effects (tens of steps against an outcome whose spread is hundreds) it is learned from the
  outcome minus a cross-fitted base, as an R-learner (Nie & Wager, 2021) per type against
  sending nothing: target (y - base(x)) / (t - e), weight (t - e)^2, where t says whether the
  type was sent and e is its logged probability among {type, none}. The exact logged
  propensities make the target unbiased; the residual removes the baseline's variance.

The acting model predicts the chance the person acts on a nudge (the device's ACTED feedback)
from the same inputs: one booster per type with MIN_ACTS acts of its own, and a pooled one, with
the type as an input column, for the others (the pooled booster alone, like a single effect
booster, did not split on the type where acting depended on type and time together: on logs
where walking is acted on at midday and a break in the evening it predicted the same for
both). Acting is a far less noisy signal than 30-minute steps (a
yes/no per nudge instead of an outcome whose spread is ~15 times the effect), so once the types
whose outcome is steps have MIN_ACTS acted nudges between them, their effect is predicted as
P(act | x, a) x the steps an act adds: the mean residual after acted minus after not-acted
nudges, of the type itself once it has MIN_ACTS acts, else pooled over the steps types. That
reads "a nudge adds steps through the people who act on it"; the promotion gate (ope.py)
checks the resulting policy on the measured steps, so a type whose acts add no steps gets no
effect and a proposal that does not pay off is not promoted. Types whose outcome is not steps
keep the R-learner.

The model also carries its `send_threshold`: the predicted gain a nudge must reach to get the
greedy mass, set at training from the *recent* decisions (the last `BUDGET_DAYS` days of the
log) so that the policy, exploration included, would send at most `daily_budget` nudges per
person-day on them (never below the catalog's `min_gain_steps`; see `_threshold`).

With `support_sends` (policy.support_sends) it also carries its `support`: each type's
predicted effect in a quarter of the day is scaled by n / (n + support_sends), n the nudges of
that type its training log sent there, so that where the log hardly ever sent (a cold start
exploring at a few percent) the trees' extrapolations do not win the greedy mass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from pulsesync.server.nudges.features import FEATURE_NAMES, HOUR_BUCKETS, hour_bucket
from pulsesync.timeutil import US_PER_DAY

NONE: Final = "none"
ACTION_COLUMNS: Final = ("action", "action_past_gain", "action_past_response")
COLUMNS: Final = (*FEATURE_NAMES, *ACTION_COLUMNS)
_LOCAL_MINUTE: Final = COLUMNS.index("local_minute")
# Baseline: a few thousand outcomes, strong leaves; squared error (DR needs conditional means,
# and a robust loss would shrink the rare long walks that make up the effect).
BASE_PARAMS: Final[dict[str, Any]] = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 7,
    "min_data_in_leaf": 60,
    "lambda_l2": 10.0,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "verbosity": -1,
    "num_threads": 1,
    "deterministic": True,
    "seed": 7,
}
BASE_ROUNDS: Final = 150
# Effect: the signal is ~10x weaker than the baseline's, so shallower trees, bigger leaves and
# a slower rate (measured on simulated logs: deeper trees fit the noise and rank types wrongly).
EFFECT_PARAMS: Final[dict[str, Any]] = {
    **BASE_PARAMS,
    "num_leaves": 4,
    "min_data_in_leaf": 150,
    "learning_rate": 0.03,
}
EFFECT_ROUNDS: Final = 200
# Cross-fitting folds for the residuals (by user: a person's own days never fit their residual).
FOLDS: Final = 2
# R-learner rows whose conditional propensity is this close to 0 or 1 are skipped: their
# target (y - base) / (t - e) would be unbounded (the exploration floor keeps them rare).
MIN_PROPENSITY: Final = 0.02
# A type needs this many randomized rows (sent or not, against nothing) for an effect booster.
MIN_EFFECT_ROWS: Final = 30
# Acting on a nudge: a yes/no per sent nudge, a few percent of them yes. Small trees with
# leaves big enough to hold several acts.
RESPONSE_PARAMS: Final[dict[str, Any]] = {
    **BASE_PARAMS,
    "objective": "binary",
    "num_leaves": 4,
    "min_data_in_leaf": 80,
    "learning_rate": 0.05,
}
RESPONSE_ROUNDS: Final = 150
# Acted nudges needed before the response model predicts effects (and, per type, before a
# type's own steps per act replace the pooled figure).
MIN_ACTS: Final = 20
# The send threshold is calibrated on the decisions of this many days before the latest one:
# predicted gains drift as people habituate, so a threshold set over the whole log (early,
# unburdened days with large predicted gains) sends far less than its budget later.
BUDGET_DAYS: Final = 7.0
_NO_RESPONSE: Final[Mapping[str, float]] = {}


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision with its context, logged choice and probability, and measured outcome."""

    user_id: int
    decision_us: int
    features: dict[str, float]
    past_gain: dict[str, float]
    options: dict[str, float]
    chosen: str
    probability: float
    outcome: float
    acted: bool = False  # the device reported that the person acted on the nudge sent
    past_response: Mapping[str, float] = field(default_factory=dict)  # type -> acted share


def row(
    features: Mapping[str, float],
    past_gain: Mapping[str, float],
    action_index: int,
    action: str,
    past_response: Mapping[str, float] = _NO_RESPONSE,
) -> list[float]:
    """One model input row for an action."""
    return [
        *(float(features.get(n, 0.0)) for n in FEATURE_NAMES),
        float(action_index),
        float(past_gain.get(action, 0.0)),
        float(past_response.get(action, 0.0)),
    ]


class OutcomeModel:
    """Predicts the outcome of each candidate action in a context."""

    def __init__(
        self,
        base: lgb.Booster,
        effect: lgb.Booster | Mapping[str, lgb.Booster],
        actions: Sequence[str],
        version: str,
        send_threshold: float = 0.0,
        learned_actions: Sequence[str] | None = None,
        response: lgb.Booster | None = None,
        act_gain: Mapping[str, float] | None = None,
        columns: Sequence[str] = COLUMNS,
        responses: Mapping[str, lgb.Booster] | None = None,
        support: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        if tuple(columns) != COLUMNS[: len(columns)]:
            raise ValueError(
                f"the model was trained on other inputs ({', '.join(columns)}); train a new one"
            )
        # Inputs are only ever appended: a model saved before the last ones were added reads
        # the leading columns of a row.
        self.columns = tuple(columns)
        self.base = base
        # One booster per type; a model saved before that has one booster shared by the types.
        self.effect = effect
        self.effects: dict[str, lgb.Booster] = (
            {} if isinstance(effect, lgb.Booster) else dict(effect)
        )
        self.actions = tuple(actions)
        self.version = version
        self.send_threshold = send_threshold
        self._index = {a: i for i, a in enumerate(self.actions)}
        # Types with R-learner rows in training; any other (e.g. a type never sent, or one
        # whose outcome is "acted") is predicted like sending nothing, never from trees that
        # never saw it.
        self.learned_actions = frozenset(
            a for a in (self.actions if learned_actions is None else learned_actions) if a != NONE
        )
        # Types whose effect is P(act) x the steps an act adds (see the module docstring):
        # P(act) from the type's own booster, else from the pooled one.
        self.response = response
        self.responses = dict(responses or {}) if response is not None else {}
        self.act_gain = dict(act_gain or {}) if response is not None else {}
        # Type -> the factor on its predicted effect in each quarter of the day (hour_bucket;
        # see train's support_sends); a type not listed keeps its effect.
        self.support = {a: tuple(float(f) for f in fs) for a, fs in (support or {}).items()}

    def min_gain(self, catalog_min_gain: float) -> float:
        """The gain over sending nothing a nudge must be predicted to reach."""
        return max(catalog_min_gain, self.send_threshold)

    def _q(self, x: npt.NDArray[np.float64], actions: Sequence[str]) -> npt.NDArray[np.float64]:
        """Predicted outcomes of input rows x, row i being for actions[i]."""
        x_model = x[:, : len(self.columns)]
        effect = np.zeros(len(actions))
        kinds = np.array(actions, dtype=object)
        learned = np.array([a in self.learned_actions for a in actions], dtype=bool)
        if learned.any() and isinstance(self.effect, lgb.Booster):
            effect = np.where(learned, self.effect.predict(x_model, num_threads=1), 0.0)
        elif learned.any():
            for a, booster in self.effects.items():
                mask = (kinds == a) & learned
                if mask.any():
                    effect[mask] = booster.predict(x_model[mask], num_threads=1)
        gain = np.array([self.act_gain.get(a, np.nan) for a in actions], dtype=np.float64)
        by_acts = ~np.isnan(gain)
        if self.response is not None and by_acts.any():
            p_act = np.zeros(len(actions))
            pooled = by_acts & ~np.isin(kinds, list(self.responses))
            if pooled.any():
                p_act[pooled] = self.response.predict(x_model[pooled], num_threads=1)
            for a, booster in self.responses.items():
                mask = (kinds == a) & by_acts
                if mask.any():
                    p_act[mask] = booster.predict(x_model[mask], num_threads=1)
            effect = np.where(by_acts, p_act * np.nan_to_num(gain), effect)
        if self.support:
            buckets = [hour_bucket(int(m)) for m in x[:, _LOCAL_MINUTE]]
            effect = effect * np.array(
                [
                    self.support[a][b] if a in self.support else 1.0
                    for a, b in zip(actions, buckets, strict=True)
                ]
            )
        base = self.base.predict(x[:, : len(FEATURE_NAMES)], num_threads=1)
        return np.asarray(base + effect, dtype=np.float64)

    def predict(
        self,
        features: Mapping[str, float],
        past_gain: Mapping[str, float],
        options: Sequence[str],
        past_response: Mapping[str, float] = _NO_RESPONSE,
    ) -> dict[str, float]:
        """Predicted outcome for each option (actions unknown to the model get send-nothing's)."""
        x = np.array(
            [row(features, past_gain, self._index.get(a, 0), a, past_response) for a in options],
            dtype=np.float64,
        )
        return {a: float(v) for a, v in zip(options, self._q(x, options), strict=True)}

    def predict_many(
        self, decisions: Sequence[LoggedDecision], actions: Sequence[str]
    ) -> npt.NDArray[np.float64]:
        """q(x_i, a) for every decision i and action a: shape (n, len(actions))."""
        n = len(decisions)
        rows = [
            row(d.features, d.past_gain, self._index.get(a, 0), a, d.past_response)
            for d in decisions
            for a in actions
        ]
        x = np.array(rows, dtype=np.float64).reshape(n * len(actions), len(COLUMNS))
        return self._q(x, list(actions) * n).reshape(n, len(actions))

    def parts(self) -> dict[str, str]:
        """The boosters as LightGBM text models, by part: "base", "effect.<type>" (or "effect"
        for a shared effect booster), "response" (pooled) and "response.<type>" (the registry
        stores them)."""
        out = {"base": self.base.model_to_string()}
        if isinstance(self.effect, lgb.Booster):
            out["effect"] = self.effect.model_to_string()
        for a, booster in self.effects.items():
            out[f"effect.{a}"] = booster.model_to_string()
        if self.response is not None:
            out["response"] = self.response.model_to_string()
        for a, booster in self.responses.items():
            out[f"response.{a}"] = booster.model_to_string()
        return out

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, str],
        actions: Sequence[str],
        version: str,
        send_threshold: float = 0.0,
        learned_actions: Sequence[str] | None = None,
        act_gain: Mapping[str, float] | None = None,
        columns: Sequence[str] = COLUMNS,
        support: Mapping[str, Sequence[float]] | None = None,
    ) -> OutcomeModel:
        """A model from the parts written by parts() (support: as the model held it)."""
        base = lgb.Booster(model_str=parts["base"])
        effect: lgb.Booster | dict[str, lgb.Booster] = (
            lgb.Booster(model_str=parts["effect"])
            if "effect" in parts
            else {
                a: lgb.Booster(model_str=parts[f"effect.{a}"])
                for a in (actions if learned_actions is None else learned_actions)
                if a != NONE and f"effect.{a}" in parts
            }
        )
        response = (
            lgb.Booster(model_str=parts["response"]) if act_gain and "response" in parts else None
        )
        # A model saved before the per-type acting boosters has the pooled one only.
        responses = {
            a: lgb.Booster(model_str=parts[f"response.{a}"])
            for a in actions
            if response is not None and f"response.{a}" in parts
        }
        return cls(
            base,
            effect,
            actions,
            version,
            send_threshold,
            learned_actions,
            response,
            act_gain,
            columns,
            responses,
            support,
        )


def _fit(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    w: npt.NDArray[np.float64] | None,
    names: Sequence[str],
    categorical: Sequence[str],
    params: Mapping[str, Any],
    rounds: int,
) -> lgb.Booster:
    data = lgb.Dataset(
        x,
        label=y,
        weight=w,
        feature_name=list(names),
        categorical_feature=list(categorical),
        free_raw_data=True,
    )
    return lgb.train(dict(params), data, num_boost_round=rounds)


_BASE_CAT: Final = ("active_kind", "active_app")


def _context(decisions: Sequence[LoggedDecision]) -> npt.NDArray[np.float64]:
    return np.array(
        [[float(d.features.get(n, 0.0)) for n in FEATURE_NAMES] for d in decisions],
        dtype=np.float64,
    ).reshape(len(decisions), len(FEATURE_NAMES))


def _fit_base(decisions: Sequence[LoggedDecision]) -> lgb.Booster:
    return _fit(
        _context(decisions),
        np.array([d.outcome for d in decisions], dtype=np.float64),
        None,
        FEATURE_NAMES,
        _BASE_CAT,
        BASE_PARAMS,
        BASE_ROUNDS,
    )


def train(
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    version: str,
    *,
    daily_budget: float | None = None,
    min_gain: float = 0.0,
    exploration_floor: float = 0.0,
    steps_types: Collection[str] | None = None,
    support_sends: float = 0.0,
) -> OutcomeModel:
    """Fit the base, effect and acting models on logged decisions (a few hundred at least).

    daily_budget: nudges per person-day the policy may send on average (None: no budget, the
    threshold is min_gain); exploration_floor: the policy's floor per option, whose sends
    count against the budget. steps_types: the types whose outcome is steps (the acting model
    predicts their effect); by default every type. support_sends > 0: each type's predicted
    effect in a quarter of the day is scaled by n / (n + support_sends), n the nudges of that
    type sent there in these decisions (policy.support_sends).
    """
    if len(decisions) < 50:
        raise ValueError(
            f"need at least 50 decisions with outcomes to train, have {len(decisions)}"
        )
    nothing = [d for d in decisions if d.chosen == NONE]
    if len(nothing) < 20:
        raise ValueError(f"need decisions where nothing was sent to train, have {len(nothing)}")
    index = {a: i for i, a in enumerate(actions)}
    # Cross-fitted baseline by user: each residual comes from a model that never saw the person.
    resid = np.empty(len(decisions))
    fold_of = np.array([d.user_id % FOLDS for d in decisions])
    x_all = _context(decisions)
    y_all = np.array([d.outcome for d in decisions], dtype=np.float64)
    for k in range(FOLDS):
        fit_on = [d for d in nothing if d.user_id % FOLDS != k]
        part = fold_of == k
        if not part.any():
            continue
        if (
            len(fit_on) < 20
        ):  # one user only: fall back to all of them (still out of sample in time)
            fit_on = nothing
        m = _fit_base(fit_on)
        resid[part] = y_all[part] - m.predict(x_all[part], num_threads=1)
    base = _fit_base(nothing)
    rows: dict[str, list[list[float]]] = {}
    target: dict[str, list[float]] = {}
    weight: dict[str, list[float]] = {}
    for d, r in zip(decisions, resid, strict=True):
        e0 = d.options.get(NONE, 0.0)
        if d.chosen not in index:
            continue
        for a, ea in d.options.items():
            if a == NONE or a not in index or ea <= 0.0 or e0 <= 0.0:
                continue
            if d.chosen not in (a, NONE):
                continue
            e = ea / (ea + e0)
            if not MIN_PROPENSITY <= e <= 1 - MIN_PROPENSITY:
                continue
            t = 1.0 if d.chosen == a else 0.0
            rows.setdefault(a, []).append(
                row(d.features, d.past_gain, index[a], a, d.past_response)
            )
            target.setdefault(a, []).append(r / (t - e))
            weight.setdefault(a, []).append((t - e) ** 2)
    total = sum(len(v) for v in rows.values())
    if total < 50:
        raise ValueError(
            f"need at least 50 decisions where a nudge or nothing was randomized, have {total}"
        )
    # One booster per type with enough randomized rows; with few rows its big leaves make it
    # the type's average effect. A type with fewer rows is predicted like sending nothing.
    effects = {
        a: _fit(
            np.array(rows[a], dtype=np.float64),
            np.array(target[a], dtype=np.float64),
            np.array(weight[a], dtype=np.float64),
            COLUMNS,
            list(_BASE_CAT),
            EFFECT_PARAMS,
            EFFECT_ROUNDS,
        )
        for a in sorted(rows)
        if len(rows[a]) >= MIN_EFFECT_ROWS
    }
    learned = set(effects)
    steps = [a for a in actions if a != NONE] if steps_types is None else list(steps_types)
    response, act_gain, responses = _fit_response(decisions, resid, index, steps)
    model = OutcomeModel(
        base,
        effects,
        actions,
        version,
        0.0,
        sorted(learned),
        response,
        act_gain,
        responses=responses,
        support=_support(decisions, actions, support_sends),
    )
    model.send_threshold = _threshold(model, decisions, daily_budget, min_gain, exploration_floor)
    return model


def _support(
    decisions: Sequence[LoggedDecision], actions: Sequence[str], support_sends: float
) -> dict[str, list[float]]:
    """Per type, n / (n + support_sends) in each quarter of the day, n its nudges sent there
    ({} when support_sends is 0: no scaling)."""
    if support_sends <= 0.0:
        return {}
    sent = {a: [0] * HOUR_BUCKETS for a in actions if a != NONE}
    for d in decisions:
        if d.chosen in sent:
            sent[d.chosen][hour_bucket(int(d.features.get("local_minute", 0.0)))] += 1
    return {a: [n / (n + support_sends) for n in counts] for a, counts in sent.items()}


def _fit_response(
    decisions: Sequence[LoggedDecision],
    resid: npt.NDArray[np.float64],
    index: Mapping[str, int],
    steps_types: Collection[str],
) -> tuple[lgb.Booster | None, dict[str, float], dict[str, lgb.Booster]]:
    """The acting model over every sent nudge (pooled, the type an input column), the steps
    an act adds per steps type, and an acting booster per steps type with MIN_ACTS acts of
    its own (fitted on that type's nudges only).

    The steps an act adds: the mean cross-fitted residual after acted nudges minus after the
    others, per type once it has MIN_ACTS acts. A steps type with fewer acts gets the value
    pooled over all steps types: its effect is then P(act) x that, near zero for a type that
    was sent often and hardly ever acted on (rather than its R-learner estimate, which is
    noise around zero and would win the greedy mass by chance). Types whose outcome is not
    steps keep the R-learner.
    """
    sent = [
        (d, r)
        for d, r in zip(decisions, resid, strict=True)
        if d.chosen != NONE and d.chosen in index
    ]

    def gain(rows: list[tuple[LoggedDecision, float]]) -> float | None:
        acted = [r for d, r in rows if d.acted]
        other = [r for d, r in rows if not d.acted]
        if len(acted) < MIN_ACTS or not other:
            return None
        return max(0.0, float(np.mean(acted)) - float(np.mean(other)))

    pooled = gain([(d, r) for d, r in sent if d.chosen in steps_types])
    if pooled is None:
        return None, {}, {}
    act_gain: dict[str, float] = {}
    for a in steps_types:
        if a in index and a != NONE:
            own = gain([(d, r) for d, r in sent if d.chosen == a])
            act_gain[a] = pooled if own is None else own
    x = np.array(
        [row(d.features, d.past_gain, index[d.chosen], d.chosen, d.past_response) for d, _ in sent],
        dtype=np.float64,
    ).reshape(len(sent), len(COLUMNS))
    y = np.array([1.0 if d.acted else 0.0 for d, _ in sent], dtype=np.float64)
    categorical = [*_BASE_CAT, "action"]
    response = _fit(x, y, None, COLUMNS, categorical, RESPONSE_PARAMS, RESPONSE_ROUNDS)
    kinds = np.array([d.chosen for d, _ in sent], dtype=object)
    responses = {
        a: _fit(x[mine], y[mine], None, COLUMNS, categorical, RESPONSE_PARAMS, RESPONSE_ROUNDS)
        for a in sorted(act_gain)
        if (mine := kinds == a).any() and y[mine].sum() >= MIN_ACTS
    }
    return response, act_gain, responses


def recent_from(decisions: Sequence[LoggedDecision], days: float) -> int:
    """The start of the last `days` days of decisions (oldest first): the latest decision's
    time less `days` (0 when days is 0 or there are none: every decision)."""
    if days <= 0 or not decisions:
        return 0
    return decisions[-1].decision_us - int(days * US_PER_DAY)


def local_day(d: LoggedDecision) -> int:
    """The decision's local day number (its UTC minute less its local minute of the day)."""
    minute = d.decision_us // 60_000_000 - int(d.features.get("local_minute", 0.0))
    return round(minute / 1440)


def best_gain(predicted: Mapping[str, float], options: Collection[str]) -> float:
    """The largest predicted gain of a nudge over sending nothing at a decision point."""
    base = predicted.get(NONE, 0.0)
    gains = [predicted[a] - base for a in options if a != NONE and a in predicted]
    return max(gains, default=-math.inf)


def budget_threshold(
    best: npt.NDArray[np.float64],
    options: npt.NDArray[np.float64],
    person_days: int,
    daily_budget: float,
    min_gain: float,
    floor: float,
) -> float:
    """The lowest threshold (>= min_gain) at which the greedy-with-floor policy would send at
    most daily_budget nudges per person-day at decision points with these best predicted
    gains and option counts (send-nothing included), the floor's sends included.

    The expected sends are exact given the threshold (policy.greedy_with_floor): 1 - floor at
    a point whose best gain exceeds it, the floor of each type elsewhere. When even the
    highest threshold sends too many (exploration alone is over the budget), that one.
    """
    if best.size == 0:
        return min_gain
    allowed = daily_budget * person_days
    f = np.minimum(floor, 1.0 / np.maximum(options, 1.0))
    explore = float((f * (options - 1.0)).sum())
    # Sends at threshold c: the floor's everywhere, plus (1 - f K) more at each point whose
    # best gain exceeds c; so sort the points by gain and add up, highest first.
    order = np.argsort(-best, kind="stable")
    extra = np.concatenate(([0.0], np.cumsum((1.0 - f * options)[order])))
    ascending = np.sort(best)
    candidates = np.unique(
        np.concatenate(([min_gain], best[np.isfinite(best) & (best > min_gain)]))
    )
    above = len(best) - np.searchsorted(ascending, candidates, side="right")
    sends = explore + extra[above]
    ok = candidates[sends <= allowed + 1e-9]
    return float(ok.min()) if ok.size else float(candidates.max())


def _threshold(
    model: OutcomeModel,
    decisions: Sequence[LoggedDecision],
    daily_budget: float | None,
    min_gain: float,
    floor: float = 0.0,
) -> float:
    """The send threshold for daily_budget nudges per person-day over the last BUDGET_DAYS of
    the log, re-predicted by the model (budget_threshold).

    A causal rule: at a decision point the policy sees only this point's predicted gain, never
    the rest of the day, so "the top k of the day" becomes a threshold set on recent days at
    which about k points a day would pass. Person-days count every decision point logged
    (those without a choice too). The server then keeps the rate at the budget on the
    policy's own decision points (pacing.BudgetPacer).
    """
    if daily_budget is None or not decisions:
        return min_gain
    since = recent_from(decisions, BUDGET_DAYS)
    recent = [d for d in decisions if d.decision_us >= since]
    person_days = len({(d.user_id, local_day(d)) for d in recent})
    choice = [d for d in recent if len(d.options) > 1]
    if not choice:
        return min_gain
    q = model.predict_many(choice, model.actions)
    best = np.array(
        [
            best_gain(dict(zip(model.actions, q[i], strict=True)), list(d.options))
            for i, d in enumerate(choice)
        ]
    )
    k = np.array([float(len(d.options)) for d in choice])
    return budget_threshold(best, k, person_days, daily_budget, min_gain, floor)


def meta_json(model: OutcomeModel, extra: Mapping[str, Any]) -> str:
    """The metadata stored with a model (the registry adds its evaluation)."""
    return json.dumps(
        {
            "version": model.version,
            "actions": list(model.actions),
            "columns": list(model.columns),
            "send_threshold": model.send_threshold,
            "learned_actions": sorted(model.learned_actions),
            "act_gain": model.act_gain,
            "support": {a: list(f) for a, f in model.support.items()},
            **extra,
        },
        indent=2,
        sort_keys=True,
    )
