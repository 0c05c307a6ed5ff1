"""Privacy accounting shared by testbed's DP mechanisms (see docs/privacy.md).

Composition over rounds is Opacus' (``opacus.accountants``). Two pieces Opacus does not
offer are derived here and say so:

- ``gaussian_epsilon``: the exact (epsilon, delta) curve of ONE Gaussian mechanism,
  Balle & Wang 2018 ("Improving the Gaussian mechanism for differential privacy:
  analytical calibration and optimal denoising", Thm. 8). Opacus' accountants bound a
  single Gaussian through RDP/PRV; this is the tight value, used for lower-bound figures
  (the epsilon one pair of datasets already needs) and in tests as the reference.
- ``cumulative_mu``: the Gaussian-DP parameter of releasing running sums with fresh
  noise each round (``paper_dp``'s downlink), derived in ``testbed/builtins/dp.py``.

Viewpoints and sampling are named here so that every mechanism's report says the same
thing in the same words.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from opacus.accountants import create_accountant
from scipy.optimize import brentq
from scipy.stats import norm

SERVER = "server"
ONE_RECIPIENT = "one recipient"
ALL_RECIPIENTS = "colluding recipients (all clients)"
PUBLISHED_MODEL = "anyone who sees the published model (server excluded)"

History = tuple[tuple[float, float, int], ...]
"""An Opacus accountant's history: (noise multiplier, sample rate, steps) entries."""


@functools.lru_cache(maxsize=4096)
def opacus_epsilon(accountant: str, delta: float, history: History) -> float:
    """Epsilon of Opacus' ``accountant`` after ``history``; cached, since Opacus' RDP
    conversion takes ~0.3 s in Python and equal histories are common."""
    if not history:
        return 0.0
    if any(z == 0 for z, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        # With tiny noise the optimum sits at Opacus' smallest RDP order; the epsilon is
        # then huge either way, and the report shows it.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a Gaussian mechanism with sensitivity / noise std = mu (Balle &
    Wang 2018, Thm. 8): Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    a = norm.cdf(mu / 2 - epsilon / mu)
    # e^eps * Phi(.) in logs: e^eps overflows long before the product does
    b = math.exp(epsilon + norm.logcdf(-mu / 2 - epsilon / mu))
    return max(float(a - b), 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with gaussian_delta(mu, epsilon) <= delta (exact, not a bound);
    inf for mu = inf, 0 for mu = 0."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))


def cumulative_mu(sensitivity: Sequence[float], noise_std: Sequence[float]) -> float:
    """GDP parameter mu of releasing y_r = S_r + N(0, s_r^2 I), r = 1..T, where
    S_r = sum_{j<=r} c_j and one party's contribution to round j has norm <= sensitivity[j]:
    mu^2 = sum_r (sum_{j<=r} sensitivity[j])^2 / s_r^2 (the worst case: every round's
    contribution points the same way). A round with zero noise after a contribution gives
    inf."""
    total, mu2 = 0.0, 0.0
    for c, s in zip(sensitivity, noise_std, strict=True):
        total += c
        if total == 0:
            continue
        if s == 0:
            return math.inf
        mu2 += (total / s) ** 2
    return math.sqrt(mu2)


def accountant_sample_rate(client_sampling: str, sample_rate: float) -> float:
    """The client sampling rate an accountant may use: q under Poisson sampling
    (amplification, Mironov et al. 2019 as implemented by Opacus); 1 under fixed-size
    sampling without replacement, for which testbed claims no amplification."""
    return sample_rate if client_sampling == "poisson" else 1.0


def sampling_note(client_sampling: str, sample_rate: float, amplified: bool) -> str:
    """One line for the report: how clients were sampled and what the epsilon assumes."""
    if client_sampling == "poisson":
        how = f"poisson, q = {sample_rate:.4g}"
        return how + (" (amplification accounted)" if amplified else " (no amplification claimed)")
    return f"fixed, {sample_rate:.4g} of the clients without replacement (no amplification)"


def fixed_denominator(
    sizes: Sequence[int], sample_rate: float, kept: Iterable[int]
) -> tuple[float, float]:
    """For Poisson client sampling, DP-FedAvg's fixed-denominator estimator (McMahan et al.
    2018, "Learning differentially private recurrent language models", f_f):
    sum_{k kept} n_k u_k / (q W), W = sum of all clients' n_k. Returns (the factor that
    turns the size-weighted mean over the kept clients into it, the largest weight
    n_k / (q W) of any client). Dividing by q W rather than by the sampled total keeps one
    client's influence independent of who else was sampled, which the amplification
    analysis needs (a renormalised mean reveals whether the client was sampled)."""
    total = float(sum(sizes))
    kept_total = float(sum(sizes[c] for c in kept))
    scale = kept_total / (sample_rate * total)
    return scale, max(sizes) / (sample_rate * total)


def viewpoints(epsilons: dict[str, float]) -> dict[str, Any]:
    """``epsilon_by_viewpoint`` as the report shows it (plain floats)."""
    return {k: float(v) for k, v in epsilons.items()}


def report_notes(spent: dict[str, Any]) -> list[str]:
    """The report's lines under a mechanism's privacy table: its note, whom the epsilon
    holds against and under which sampling, each viewpoint's epsilon, and an audit's
    lower bound beside the claim (flagged when it refutes it)."""
    lines = [str(spent["note"])] if spent.get("note") else []
    if spent.get("against"):
        lines.append(
            f"level {spent.get('level', '?')}; holds against: {spent['against']}; "
            f"client sampling: {spent.get('sampling', '?')}"
        )
    views = spent.get("epsilon_by_viewpoint") or {}
    if views:
        # float(): metrics.json stores infinity as the string "inf"
        lines.append(
            "epsilon by viewpoint: " + "; ".join(f"{k} {float(v):.4g}" for k, v in views.items())
        )
    audit = spent.get("audit")
    if audit:
        lines.append(
            f"audit: claimed epsilon {float(audit['claimed_epsilon']):.4g}, audited lower "
            f"bound {float(audit['lower_bound']):.4g} ({float(audit['confidence']):.0%} "
            f"confidence): {audit['verdict']}"
        )
    return lines


# What a privacy figure must state to be sound (hookspecs.testbed_privacy_spent)
RECORD_KEYS = ("mechanism", "accountant", "epsilon", "delta", "level", "against", "sampling")


def record_problem(rec: Any) -> str | None:
    """Why a mechanism's privacy record is not a sound figure, else None: it must say what
    it is (mechanism, accountant), how much (epsilon >= 0, delta in [0, 1)), at what level,
    against whom and under which client sampling it holds."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not a dict"
    missing = [k for k in RECORD_KEYS if rec.get(k) in (None, "")]
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        eps, delta = float(rec["epsilon"]), float(rec["delta"])
    except (TypeError, ValueError):
        return f"has epsilon {rec['epsilon']!r} and delta {rec['delta']!r}, not numbers"
    if math.isnan(eps) or eps < 0:
        return f"has epsilon {eps}, not >= 0"
    if not 0 <= delta < 1:
        return f"has delta {delta}, not in [0, 1)"
    return None
