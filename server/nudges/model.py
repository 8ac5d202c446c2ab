"""The outcome model: LightGBM predicts steps in the next 30 minutes for each candidate action.

Two boosters make one prediction, q(x, a) = base(x) + effect(x, a):
* `base` predicts the outcome from the context alone (what happens if nothing is sent);
* `effect` predicts what is left (the outcome minus a cross-fitted base) from the context
  and the action, weighted by the inverse logged propensity (capped), so that its trees spend
  their splits on how the action changes the outcome rather than on re-learning the baseline
  (a residualized "S-learner"). Sending nothing is an action like any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from pulsesync.server.nudges.features import FEATURE_NAMES

ACTION_COLUMNS: Final = ("action", "action_past_gain")
COLUMNS: Final = (*FEATURE_NAMES, *ACTION_COLUMNS)
# Inverse-propensity weights are capped: a 5% exploration choice counts 10x, not 20x, which
# trades a little bias for much less variance with a few thousand decisions.
MAX_WEIGHT: Final = 10.0
# Small trees, strong leaves: a few thousand noisy outcomes support little more.
BASE_PARAMS: Final[dict[str, Any]] = {
    "objective": "huber",
    "alpha": 600.0,  # steps: outcomes beyond this are treated linearly (walks are heavy-tailed)
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbosity": -1,
    "num_threads": 1,
    "deterministic": True,
    "seed": 7,
}
ROUNDS: Final = 200


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


def row(
    features: Mapping[str, float], past_gain: Mapping[str, float], action_index: int, action: str
) -> list[float]:
    """One model input row for an action."""
    return [
        *(float(features.get(n, 0.0)) for n in FEATURE_NAMES),
        float(action_index),
        float(past_gain.get(action, 0.0)),
    ]


class OutcomeModel:
    """Predicts the outcome of each candidate action in a context."""

    def __init__(
        self, base: lgb.Booster, effect: lgb.Booster, actions: Sequence[str], version: str
    ) -> None:
        self.base = base
        self.effect = effect
        self.actions = tuple(actions)
        self.version = version
        self._index = {a: i for i, a in enumerate(self.actions)}

    def predict(
        self, features: Mapping[str, float], past_gain: Mapping[str, float], options: Sequence[str]
    ) -> dict[str, float]:
        """Predicted outcome for each option (actions unknown to the model get send-nothing's)."""
        x = np.array(
            [row(features, past_gain, self._index.get(a, 0), a) for a in options], dtype=np.float64
        )
        b = self.base.predict(x[:, : len(FEATURE_NAMES)], num_threads=1)
        e = self.effect.predict(x, num_threads=1)
        return {a: float(bv + ev) for a, bv, ev in zip(options, b, e, strict=True)}

    def predict_many(
        self, decisions: Sequence[LoggedDecision], actions: Sequence[str]
    ) -> npt.NDArray[np.float64]:
        """q(x_i, a) for every decision i and action a: shape (n, len(actions))."""
        n = len(decisions)
        rows = [
            row(d.features, d.past_gain, self._index.get(a, 0), a)
            for d in decisions
            for a in actions
        ]
        x = np.array(rows, dtype=np.float64).reshape(n * len(actions), len(COLUMNS))
        q = self.base.predict(x[:, : len(FEATURE_NAMES)], num_threads=1) + self.effect.predict(
            x, num_threads=1
        )
        return np.asarray(q, dtype=np.float64).reshape(n, len(actions))

    def save(self, stem: Path) -> None:
        """Write stem.base.txt, stem.effect.txt and stem.json."""
        self.base.save_model(str(stem.with_suffix(".base.txt")))
        self.effect.save_model(str(stem.with_suffix(".effect.txt")))

    @classmethod
    def load(cls, stem: Path, actions: Sequence[str], version: str) -> OutcomeModel:
        """Read a model written by save()."""
        base = lgb.Booster(model_file=str(stem.with_suffix(".base.txt")))
        effect = lgb.Booster(model_file=str(stem.with_suffix(".effect.txt")))
        return cls(base, effect, actions, version)


def _fit(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    w: npt.NDArray[np.float64] | None,
    names: Sequence[str],
    categorical: Sequence[str],
) -> lgb.Booster:
    data = lgb.Dataset(
        x,
        label=y,
        weight=w,
        feature_name=list(names),
        categorical_feature=list(categorical),
        free_raw_data=True,
    )
    return lgb.train(BASE_PARAMS, data, num_boost_round=ROUNDS)


def train(
    decisions: Sequence[LoggedDecision], actions: Sequence[str], version: str
) -> OutcomeModel:
    """Fit base and effect boosters on logged decisions (needs at least a few hundred)."""
    if len(decisions) < 50:
        raise ValueError(
            f"need at least 50 decisions with outcomes to train, have {len(decisions)}"
        )
    index = {a: i for i, a in enumerate(actions)}
    x = np.array(
        [row(d.features, d.past_gain, index.get(d.chosen, 0), d.chosen) for d in decisions],
        dtype=np.float64,
    )
    y = np.array([d.outcome for d in decisions], dtype=np.float64)
    w = np.minimum(1.0 / np.array([d.probability for d in decisions]), MAX_WEIGHT)
    xb = x[:, : len(FEATURE_NAMES)]
    base_cat = ["active_kind", "active_app"]
    # Cross-fitted baseline: each half's residual comes from a model that never saw it.
    fold = np.arange(len(decisions)) % 2 == 0
    resid = np.empty_like(y)
    for part in (fold, ~fold):
        m = _fit(xb[~part], y[~part], None, FEATURE_NAMES, base_cat)
        resid[part] = y[part] - m.predict(xb[part], num_threads=1)
    base = _fit(xb, y, None, FEATURE_NAMES, base_cat)
    effect = _fit(x, resid, w, COLUMNS, [*base_cat, "action"])
    return OutcomeModel(base, effect, actions, version)


def meta_json(model: OutcomeModel, extra: Mapping[str, Any]) -> str:
    """The metadata file written beside a model."""
    return json.dumps(
        {
            "version": model.version,
            "actions": list(model.actions),
            "columns": list(COLUMNS),
            **extra,
        },
        indent=2,
        sort_keys=True,
    )
