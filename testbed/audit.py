"""Empirical privacy audit: a statistical lower bound on epsilon from a canary experiment.

A mechanism that is (epsilon, delta)-DP bounds every membership test between two
neighbouring inputs: TPR <= e^epsilon FPR + delta (Kairouz, Oh & Viswanath 2015). So a
test that tells them apart certifies epsilon >= log((TPR - delta) / FPR); with
Clopper-Pearson bounds on TPR (lower) and FPR (upper) this holds with the stated
confidence (Jagielski, Ullman & Oprea 2020, "Auditing differentially private machine
learning: how private is private SGD?"). The strongest adversary observes the released
quantity directly and plants a canary whose contribution is as large as clipping allows
(Nasr, Song, Thakurta, Papernot & Carlini 2021, "Adversary instantiation: lower bounds
for differentially private machine learning"); that is what ``audit_dp_sgd`` does for
testbed's ``dp_sgd``, at the level where it claims privacy (one example):

- a bias-free linear model at zero on 1x2x2 images; every image is black (its gradient
  is zero) except, in the "in" world, one canary with one white pixel (a Dirac canary:
  its gradient, of norm 0.71 before clipping, exceeds C = 0.5, so it is clipped to
  exactly the sensitivity). The "out" world has a black image in its place (zero-out
  neighbours, the pair Opacus' accountant covers);
- each trial runs the mechanism's own local training (Opacus, its sampler, clipping and
  noise, with a fresh seed) and scores the trained weights by their projection on the
  canary's gradient direction;
- the threshold is chosen on half of the trials and the bound computed on the other half,
  so choosing it does not spend the confidence.

The result is compared with the epsilon the mechanism claims for the same run; a lower
bound above the claim proves the claim wrong (with the given confidence), e.g. an
accountant that under-reports. A bound below the claim says only that this experiment
could not refute it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import beta
from torch import nn

from testbed.local_training import ClientData, LocalConfig, get_weights
from testbed.scenario import Augment
from testbed.state import RoundContext


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float
    lower_bound: float
    delta: float
    confidence: float
    trials: int
    """Trials per world (half chose the threshold, half gave the bound)."""
    tpr: float
    fpr: float

    @property
    def broken(self) -> bool:
        """True when the audit refutes the claim: the mechanism (or its accountant) is
        broken, with probability at least ``confidence``."""
        return self.lower_bound > self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json's privacy entry and the report."""
        return {
            "claimed_epsilon": self.claimed_epsilon,
            "lower_bound": self.lower_bound,
            "delta": self.delta,
            "confidence": self.confidence,
            "trials_per_world": self.trials,
            "tpr": self.tpr,
            "fpr": self.fpr,
            "verdict": verdict(self.claimed_epsilon, self.lower_bound),
        }


def verdict(claimed: float, lower: float) -> str:
    """The report's one word on a claim and its audited lower bound."""
    if lower > claimed:
        return "BROKEN: audited lower bound above the claimed epsilon"
    return "consistent (the audit does not refute the claim)"


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact binomial bounds (lower, upper) on p from k successes in n trials, each
    one-sided at level alpha (Clopper & Pearson 1934)."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_counts(
    tp: int, n_in: int, fp: int, n_out: int, delta: float, alpha: float
) -> float:
    """Lower bound on epsilon from a test that said "in" for tp of n_in canary-in trials and
    fp of n_out canary-out trials: log((TPR_lo - delta) / FPR_hi), each bound one-sided at
    alpha / 2 so that both hold together with probability 1 - alpha; 0 when the test is no
    better than chance."""
    tpr_lo, _ = clopper_pearson(tp, n_in, alpha / 2)
    _, fpr_hi = clopper_pearson(fp, n_out, alpha / 2)
    if tpr_lo - delta <= fpr_hi:
        return 0.0
    return math.log((tpr_lo - delta) / fpr_hi)


def epsilon_lower_bound(
    scores_in: Sequence[float],
    scores_out: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(epsilon lower bound, TPR, FPR) of the threshold test "score >= t means in". t is
    chosen on the first half of each list (the best bound there), the bound is computed on
    the second half alone."""
    alpha = 1 - confidence
    half_in, half_out = len(scores_in) // 2, len(scores_out) // 2
    pick_in, eval_in = sorted(scores_in[:half_in]), scores_in[half_in:]
    pick_out, eval_out = scores_out[:half_out], scores_out[half_out:]

    def counts(t: float, xs_in: Sequence[float], xs_out: Sequence[float]) -> tuple[int, int]:
        return sum(x >= t for x in xs_in), sum(x >= t for x in xs_out)

    best_t, best = math.inf, -1.0
    for t in pick_in:
        tp, fp = counts(t, pick_in, pick_out)
        e = epsilon_from_counts(tp, len(pick_in), fp, len(pick_out), delta, alpha)
        if e > best:
            best_t, best = t, e
    tp, fp = counts(best_t, eval_in, eval_out)
    eps = epsilon_from_counts(tp, len(eval_in), fp, len(eval_out), delta, alpha)
    return eps, tp / max(len(eval_in), 1), fp / max(len(eval_out), 1)


# --------------------------------------------------------------------------------------
# Auditing dp_sgd with a Dirac canary
# --------------------------------------------------------------------------------------

CANARY_CLIP = 0.5
"""C of the audit: below the canary's gradient norm at zero weights (sqrt(2) / 2)."""


def _world(canary: bool, n: int) -> ClientData:
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    if canary:
        x[0, 0, 0, 0] = 255
    y = torch.zeros(n, dtype=torch.long)
    return ClientData(0, x, y, x[:1], y[:1])


def audit_dp_sgd(
    factory: Callable[[], Any],
    *,
    trials: int = 300,
    epochs: int = 1,
    n: int = 8,
    seed: int = 0,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit a ``dp_sgd``-like mechanism (``factory()`` returns a fresh one, with
    ``max_grad_norm = CANARY_CLIP``) over ``trials`` runs per world of one round of
    ``epochs`` full-batch local epochs on ``n`` images. Each trial costs one Opacus
    ``make_private``; 300 trials per world take ~10-20 s on one CPU core."""
    cfg = LocalConfig(
        epochs=epochs, batch_size=n, lr=1e-3, momentum=0.0, weight_decay=0.0,
        augment=Augment(hflip=False),
    )  # fmt: skip
    scores: dict[bool, list[float]] = {True: [], False: []}
    claimed, delta = math.nan, math.nan
    for t in range(2 * trials):
        canary = t % 2 == 1
        mech = factory()
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
        nn.init.zeros_(model[1].weight)
        ctx = RoundContext(seed + t, 1, 1, 1, (0,), {0: 1.0})
        g = torch.Generator().manual_seed(seed * 1_000_003 + t)
        mech.testbed_local_training(
            ctx=ctx, model=model, data=_world(canary, n), cfg=cfg, generator=g
        )
        w = get_weights(model).view(2, 4)
        # The canary's gradient at zero is (p - e_0) x^T = [-1/2, +1/2] on pixel 0; SGD
        # moves against it, so its projection rises by lr * C * sqrt(2) / n per step.
        scores[canary].append(float(w[0, 0] - w[1, 0]))
        if t == 0:
            spent = mech.testbed_privacy_spent()
            claimed, delta = float(spent["epsilon"]), float(spent["delta"])
    lower, tpr, fpr = epsilon_lower_bound(scores[True], scores[False], delta, confidence)
    return AuditResult(claimed, lower, delta, confidence, trials, tpr, fpr)


def audit_scenario(scenario: Any, *, trials: int = 300, seed: int = 0) -> AuditResult:
    """Audit the DP mechanism a scenario names, with its noise multiplier, accountant and
    delta, on the canary setting of ``audit_dp_sgd`` (one full-batch epoch, C =
    ``CANARY_CLIP``; privacy depends on z, q and the steps, not on C). Only ``dp_sgd`` is
    supported: the client-level mechanisms need a client-level canary (not built yet)."""
    from testbed.builtins.dpsgd import DPSGD, DPSGDParams

    dp = getattr(scenario, "dp", None)
    if dp is None or dp.name != "dp_sgd":
        has = "no [dp] table" if dp is None else f"dp.name = {dp.name!r}"
        raise ValueError(f"audit supports dp_sgd only, the scenario has {has}")
    params = {**dp.params, "max_grad_norm": CANARY_CLIP, "budget_epsilon": None}
    if params.get("target_epsilon") is not None:
        raise ValueError("audit needs a fixed noise_multiplier (target_epsilon calibrates per run)")
    p = DPSGDParams(**params)
    return audit_dp_sgd(lambda: DPSGD(p), trials=trials, seed=seed)
