"""Off-policy evaluation from logged decisions: IPS, self-normalized IPS and doubly robust.

For logged decision i with context x_i, chosen action a_i, logged probability p_i and outcome
r_i, a target policy pi and an outcome model q:

    w_i   = pi(a_i | x_i) / p_i
    IPS   = mean(w_i r_i)
    SNIPS = sum(w_i r_i) / sum(w_i)
    DR    = mean( sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) )

The policy's objective counts a cost for every nudge (`min_gain_steps`: a nudge must add at
least that many steps to be worth an interruption), so the same estimates are also reported net
of it: NET = DR - cost x (chance the policy sends a nudge), exact given pi. Promotion looks at
the net difference: a policy that reaches the same steps with fewer nudges is better.

Confidence intervals are percentile bootstrap intervals that resample *people* (a person's
decisions are correlated: their responsiveness, routine and habituation are shared), or single
decisions when no clusters are given; the difference between two policies is bootstrapped on
the same resamples (paired), which is what promotion looks at.

Bad logs are refused, not scored: a logged probability outside (0, 1] (0 makes w infinite), a
non-finite outcome or a chosen action outside the action set raises `LogError` naming the
decision and what is wrong, before any arithmetic. Support is checked and reported: `support`
is the share of the target policy's probability mass on actions the log could have taken at
that decision (offered with a positive logged probability) and that the log actually took at
least `MIN_CHOSEN` times; below `MIN_SUPPORT` the gate refuses to promote and says why (IPS
and DR cannot see the outcome of actions the log never takes). `clip` caps the importance
weights w_i at a maximum (lower variance, biased towards the logged outcomes: use it when a
few tiny logged probabilities dominate the estimate; the weight bound is reported as
`clip`). `effective_decisions` is the weights' Kish effective sample size, (sum w)^2 / sum w^2:
the number of decisions the estimate effectively rests on (all of them when the target acts
like the log; a handful when a few decisions the log explored with a tiny probability carry
most of the weight, and then the bootstrap interval is not to be trusted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from pulsesync.server.nudges.catalog import PolicySettings
from pulsesync.server.nudges.model import NONE, LoggedDecision, OutcomeModel
from pulsesync.server.nudges.policy import greedy_with_floor, randomized

BOOTSTRAP: Final = 400  # resamples: percentile bounds stable to ~1% of their width
LEVEL: Final = 0.95

# Share of the target's probability mass that must fall on supported actions for a promotion.
MIN_SUPPORT: Final = 0.95
# An action the log took fewer times than this has no outcomes to estimate its value from.
MIN_CHOSEN: Final = 10

Matrix = npt.NDArray[np.float64]


class LogError(ValueError):
    """A logged decision off-policy estimates cannot use; the message says which and why."""


def check_log(decisions: Sequence[LoggedDecision], actions: Sequence[str]) -> None:
    """Raise LogError at the first decision whose probability, outcome or action is unusable."""
    known = set(actions)
    for i, d in enumerate(decisions):
        where = f"decision {i} (user {d.user_id}, at {d.decision_us} us)"
        p = d.probability
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise LogError(
                f"{where}: logged probability {p!r} is outside (0, 1]; the importance weight"
                " would be infinite or meaningless, so the log cannot be evaluated"
            )
        if d.chosen not in known:
            raise LogError(f"{where}: chosen action {d.chosen!r} is not one of {sorted(known)}")
        if not math.isfinite(d.outcome):
            raise LogError(f"{where}: outcome {d.outcome!r} is not a finite number")


def support(decisions: Sequence[LoggedDecision], actions: Sequence[str], pi: Matrix) -> float:
    """Share of pi's probability mass on actions the log could take there and took MIN_CHOSEN times."""
    if not decisions:
        return 0.0
    taken: dict[str, int] = {}
    for d in decisions:
        taken[d.chosen] = taken.get(d.chosen, 0) + 1
    ok = np.zeros_like(pi)
    for i, d in enumerate(decisions):
        for j, a in enumerate(actions):
            if taken.get(a, 0) >= MIN_CHOSEN and (
                d.options.get(a, 0.0) > 0.0 or (a == d.chosen and not d.options)
            ):
                ok[i, j] = 1.0
    return float((pi * ok).sum() / max(float(pi.sum()), 1e-12))


def check_clip(clip: float | None) -> None:
    """A weight bound must be a finite number >= 1 (ValueError otherwise); None: no bound."""
    if clip is not None and not (math.isfinite(clip) and clip >= 1.0):
        raise ValueError(f"weight clip {clip!r} must be a finite number >= 1")


def effective_decisions(w: Matrix) -> float:
    """Kish's effective sample size of importance weights: (sum w)^2 / sum w^2."""
    square = float((w * w).sum())
    return float(w.sum()) ** 2 / square if square > 0.0 else 0.0


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate and its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {
            "value": round(self.value, 3),
            "low": round(self.low, 3),
            "high": round(self.high, 3),
        }


def policy_matrix(
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    settings: PolicySettings,
    q: Matrix | None,
    min_gain: float | None = None,
) -> Matrix:
    """pi(a | x_i) over actions for every decision: greedy on q, or randomized when q is None."""
    gain = settings.min_gain_steps if min_gain is None else min_gain
    index = {a: j for j, a in enumerate(actions)}
    out = np.zeros((len(decisions), len(actions)))
    for i, d in enumerate(decisions):
        options = [o for o in d.options if o in index]
        if q is None:
            local_minute = d.features.get("local_minute")
            probs = randomized(options, settings.cold_start_probability(local_minute))
        else:
            predicted = {o: float(q[i, index[o]]) for o in options}
            probs = greedy_with_floor(options, predicted, gain, settings.exploration_floor)
        for o, p in probs.items():
            out[i, index[o]] = p
    return out


def _per_decision(
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    pi: Matrix,
    q: Matrix,
    send_cost: float,
    clip: float | None = None,
) -> tuple[Matrix, Matrix, Matrix, Matrix]:
    index = {a: j for j, a in enumerate(actions)}
    chosen = np.array([index[d.chosen] for d in decisions])
    rows = np.arange(len(decisions))
    p = np.array([d.probability for d in decisions])
    r = np.array([d.outcome for d in decisions])
    w = pi[rows, chosen] / p
    if clip is not None:
        w = np.minimum(w, clip)
    dm = (pi * q).sum(axis=1)
    dr = dm + w * (r - q[rows, chosen])
    sends = pi.sum(axis=1) - (pi[:, index[NONE]] if NONE in index else 0.0)
    return w, w * r, dr, dr - send_cost * sends


def estimate(
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    pi: Matrix,
    q: Matrix,
    *,
    baseline_pi: Matrix | None = None,
    clusters: Sequence[int] | None = None,
    seed: int = 0,
    send_cost: float = 0.0,
    clip: float | None = None,
) -> dict[str, Estimate]:
    """IPS, SNIPS, DR and NET of pi (and of pi minus baseline_pi, keys "*_diff"), with CIs.

    With clusters (e.g. the user of each decision) the bootstrap resamples whole clusters.
    The log is checked first (LogError names the first bad decision); "support" reports the
    share of pi's mass the log supports, "effective_decisions" the weights' effective sample
    size, and "clip" the weight bound when one is given.
    """
    n = len(decisions)
    if n == 0:
        raise ValueError("no logged decisions with outcomes to evaluate on")
    check_clip(clip)
    check_log(decisions, actions)
    rng = np.random.default_rng(seed)
    if clusters is None:
        member = np.arange(n)
    else:
        _, member = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(member.max()) + 1
    # counts[b, c]: how often cluster c is drawn in resample b (multinomial = draw with replacement).
    counts = rng.multinomial(
        n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=BOOTSTRAP
    ).astype(np.float64)
    lo_q, hi_q = (1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100
    size = counts @ np.bincount(member, minlength=n_clusters).astype(np.float64)

    def per_cluster(v: Matrix) -> Matrix:
        return np.bincount(member, weights=v, minlength=n_clusters).astype(np.float64)

    def stats(w: Matrix, wr: Matrix, dr: Matrix, net: Matrix) -> dict[str, tuple[float, Matrix]]:
        sw, swr, sdr, snet = per_cluster(w), per_cluster(wr), per_cluster(dr), per_cluster(net)
        return {
            "ips": (float(wr.mean()), counts @ swr / np.maximum(size, 1.0)),
            "snips": (
                float(wr.sum() / max(w.sum(), 1e-12)),
                counts @ swr / np.maximum(counts @ sw, 1e-12),
            ),
            "dr": (float(dr.mean()), counts @ sdr / np.maximum(size, 1.0)),
            "net": (float(net.mean()), counts @ snet / np.maximum(size, 1.0)),
        }

    per_decision = _per_decision(decisions, actions, pi, q, send_cost, clip)
    target = stats(*per_decision)
    out = {
        k: Estimate(v, float(np.percentile(b, lo_q)), float(np.percentile(b, hi_q)))
        for k, (v, b) in target.items()
    }
    share = support(decisions, actions, pi)
    out["support"] = Estimate(share, share, share)
    ess = effective_decisions(per_decision[0])
    out["effective_decisions"] = Estimate(ess, ess, ess)
    if clip is not None:
        out["clip"] = Estimate(clip, clip, clip)
    if baseline_pi is not None:
        base = stats(*_per_decision(decisions, actions, baseline_pi, q, send_cost, clip))
        for k, (v, b) in target.items():
            bv, bb = base[k]
            diff = b - bb
            out[f"{k}_baseline"] = Estimate(
                bv, float(np.percentile(bb, lo_q)), float(np.percentile(bb, hi_q))
            )
            out[f"{k}_diff"] = Estimate(
                v - bv, float(np.percentile(diff, lo_q)), float(np.percentile(diff, hi_q))
            )
    return out


def candidate_matrices(
    candidate: OutcomeModel, decisions: Sequence[LoggedDecision], settings: PolicySettings
) -> tuple[Matrix, Matrix]:
    """(q, pi) of a candidate model on decisions it did not see."""
    q = candidate.predict_many(decisions, candidate.actions)
    pi = policy_matrix(
        decisions, candidate.actions, settings, q, candidate.min_gain(settings.min_gain_steps)
    )
    return q, pi


def current_matrix(
    current: OutcomeModel | None,
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    settings: PolicySettings,
) -> Matrix:
    """pi of the current policy (the randomized cold start when there is no model)."""
    if current is None:
        return policy_matrix(decisions, actions, settings, None)
    q_cur = current.predict_many(decisions, actions)
    return policy_matrix(
        decisions, actions, settings, q_cur, current.min_gain(settings.min_gain_steps)
    )


def model_matrices(
    candidate: OutcomeModel,
    current: OutcomeModel | None,
    decisions: Sequence[LoggedDecision],
    settings: PolicySettings,
) -> tuple[Matrix, Matrix, Matrix]:
    """(q, candidate pi, current pi) on decisions the candidate did not see."""
    q, pi_new = candidate_matrices(candidate, decisions, settings)
    return q, pi_new, current_matrix(current, decisions, candidate.actions, settings)


def compare(
    decisions: Sequence[LoggedDecision],
    actions: Sequence[str],
    q: Matrix,
    pi_new: Matrix,
    pi_cur: Matrix,
    settings: PolicySettings,
    seed: int = 0,
    clip: float | None = None,
) -> dict[str, Estimate]:
    """Estimates of pi_new against pi_cur (keys "*_diff"), bootstrapped by person, net of the
    nudges' cost (settings.min_gain_steps), importance weights capped at clip when given."""
    return estimate(
        decisions,
        actions,
        pi_new,
        q,
        baseline_pi=pi_cur,
        clusters=[d.user_id for d in decisions],
        seed=seed,
        send_cost=settings.min_gain_steps,
        clip=clip,
    )


def evaluate_model(
    candidate: OutcomeModel,
    current: OutcomeModel | None,
    decisions: Sequence[LoggedDecision],
    settings: PolicySettings,
    seed: int = 0,
    clip: float | None = None,
) -> dict[str, Estimate]:
    """Estimates of the candidate's policy against the current one on held-out decisions
    (importance weights capped at clip when given)."""
    q, pi_new, pi_cur = model_matrices(candidate, current, decisions, settings)
    return compare(decisions, candidate.actions, q, pi_new, pi_cur, settings, seed, clip)


def gate(estimates: dict[str, Estimate]) -> tuple[bool, str]:
    """(promote?, why): promote only if the log supports the target policy and the whole
    confidence interval of the net gain (DR less the cost of the nudges) is above zero."""
    diff = estimates.get("net_diff")
    if diff is None:
        return False, "no net gain against the current policy was estimated"
    bad = sorted(
        k
        for k, e in estimates.items()
        if not all(math.isfinite(x) for x in (e.value, e.low, e.high))
    )
    if bad:
        return False, f"refused: estimates {', '.join(bad)} are not finite numbers"
    share = estimates.get("support")
    if share is not None and share.value < MIN_SUPPORT:
        return False, (
            f"refused: only {share.value:.0%} of the candidate's choices are on actions the log"
            f" supports (needs {MIN_SUPPORT:.0%}); log more exploration of those actions first"
        )
    interval = f"[{diff.low:+.1f}, {diff.high:+.1f}]"
    if diff.low > 0.0:
        return (
            True,
            f"net gain {diff.value:+.1f} steps per decision, 95% interval {interval} above 0",
        )
    return False, (
        f"net gain {diff.value:+.1f} steps per decision, 95% interval {interval} not above 0:"
        " not shown to be better"
    )


def better(estimates: dict[str, Estimate]) -> bool:
    """Promote only if the gate (support, finite estimates, net gain above zero) says so."""
    return gate(estimates)[0]
