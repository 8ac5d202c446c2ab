"""The off-policy gate refuses logs it cannot score and reports the target policy's support."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from pulsesync.server.nudges.catalog import load_catalog
from pulsesync.server.nudges.model import LoggedDecision
from pulsesync.server.nudges.ope import Estimate, LogError, estimate, gate
from pulsesync.server.nudges.policy import randomized

ACTIONS = load_catalog().actions
WALK = "walking_suggestion"


def logged(n: int, seed: int, options: tuple[str, ...] = ("none", WALK)) -> list[LoggedDecision]:
    """Randomized logging over options; every nudge adds 50 steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        probs = randomized(list(options), 0.6)
        chosen = rng.choices(list(probs), weights=list(probs.values()))[0]
        y = rng.gauss(200, 50) + (50 if chosen != "none" else 0)
        out.append(LoggedDecision(i % 20, i, {}, {}, probs, chosen, probs[chosen], y))
    return out


def always(n: int, action: str) -> np.ndarray:
    pi = np.zeros((n, len(ACTIONS)))
    pi[:, ACTIONS.index(action)] = 1.0
    return pi


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_a_probability_outside_zero_one_is_refused_with_its_decision(bad: float) -> None:
    data = logged(200, 1)
    data[17] = replace(data[17], probability=bad)
    n = len(data)
    with pytest.raises(LogError, match=r"decision 17 .*outside \(0, 1\]"):
        estimate(data, ACTIONS, always(n, WALK), np.zeros((n, len(ACTIONS))))


def test_a_non_finite_outcome_or_unknown_action_is_refused() -> None:
    data = logged(200, 2)
    n = len(data)
    pi, q = always(n, WALK), np.zeros((n, len(ACTIONS)))
    with pytest.raises(LogError, match=r"decision 3 .*outcome nan"):
        estimate([*data[:3], replace(data[3], outcome=float("nan")), *data[4:]], ACTIONS, pi, q)
    with pytest.raises(LogError, match=r"decision 5 .*'dance'"):
        estimate([*data[:5], replace(data[5], chosen="dance"), *data[6:]], ACTIONS, pi, q)


def test_a_policy_acting_where_the_log_never_did_is_not_promoted() -> None:
    data = logged(400, 3)  # walking and none only
    n = len(data)
    other = next(a for a in ACTIONS if a not in ("none", WALK))
    est = estimate(
        data,
        ACTIONS,
        always(n, other),
        np.zeros((n, len(ACTIONS))),
        baseline_pi=always(n, "none"),
        send_cost=0.0,
    )
    assert est["support"].value == 0.0
    ok, reason = gate(est)
    assert not ok
    assert "supports" in reason
    # The same log does support a walking policy, which is promoted on its real gain.
    walk = estimate(
        data, ACTIONS, always(n, WALK), np.zeros((n, len(ACTIONS))), baseline_pi=always(n, "none")
    )
    assert walk["support"].value == 1.0
    ok, reason = gate(walk)
    assert ok, reason
    assert "above 0" in reason


def test_non_finite_estimates_are_refused_not_read_as_a_verdict() -> None:
    est = {
        "net_diff": Estimate(float("nan"), float("nan"), float("nan")),
        "support": Estimate(1.0, 1.0, 1.0),
    }
    ok, reason = gate(est)
    assert not ok
    assert "not finite" in reason


def test_clipping_bounds_the_weights_and_is_reported() -> None:
    data = logged(400, 4)
    # A few decisions with a tiny logged probability dominate unclipped IPS.
    data = [
        replace(d, probability=0.001) if i % 100 == 0 and d.chosen == WALK else d
        for i, d in enumerate(data)
    ]
    n = len(data)
    q = np.zeros((n, len(ACTIONS)))
    raw = estimate(data, ACTIONS, always(n, WALK), q)
    clipped = estimate(data, ACTIONS, always(n, WALK), q, clip=10.0)
    assert clipped["clip"].value == 10.0
    assert clipped["ips"].value < raw["ips"].value
    assert all(np.isfinite([e.value, e.low, e.high]).all() for e in clipped.values())
    with pytest.raises(ValueError, match="clip"):
        estimate(data, ACTIONS, always(n, WALK), q, clip=0.5)


def test_effective_decisions_say_how_many_decisions_an_estimate_rests_on() -> None:
    data = logged(400, 5)
    n = len(data)
    q = np.zeros((n, len(ACTIONS)))
    # The logging policy itself: every weight is 1, every decision counts.
    logging_pi = np.zeros((n, len(ACTIONS)))
    for i, d in enumerate(data):
        for a, p in d.options.items():
            logging_pi[i, ACTIONS.index(a)] = p
    assert estimate(data, ACTIONS, logging_pi, q)["effective_decisions"].value == pytest.approx(n)
    # Always walking: weight 1/0.6 on the walking decisions, 0 elsewhere; the estimate rests on them.
    walks = sum(d.chosen == WALK for d in data)
    assert estimate(data, ACTIONS, always(n, WALK), q)["effective_decisions"].value == (
        pytest.approx(walks)
    )
    # Four walks logged with probability 0.001 carry weights of 1,000: they decide the estimate.
    rare = [
        replace(d, probability=0.001) if d.chosen == WALK and i < 40 else d
        for i, d in enumerate(data)
    ]
    tiny = sum(d.probability == 0.001 for d in rare)
    assert 0 < tiny <= 40
    ess = estimate(rare, ACTIONS, always(n, WALK), q)["effective_decisions"].value
    assert ess < tiny + 2
