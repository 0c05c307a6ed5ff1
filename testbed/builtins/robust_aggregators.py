"""Byzantine-robust aggregators: thin wrappers around ``testbed.robust``.

Each factory returns ``fn(updates[k, d], sizes[k]) -> delta[d]`` and ignores ``sizes``:
the rules are unweighted by design, as in the papers. A ``check`` compares the rule's
needs with the clients sampled per round (``scenario.federation.m``), so that
``testbed validate`` rejects settings the rule cannot run with. A defence may still
drop updates in a round; with too few left the rule raises ValueError at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, NoParams, Params
from testbed.robust import bulyan, coordinate_median, krum, krum_scores, multi_krum, trimmed_mean
from testbed.robust_extra import Screening, geometric_median
from testbed.state import RoundContext

if TYPE_CHECKING:
    from testbed.scenario import Scenario

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrimmedMeanParams(Params):
    beta: float = Field(
        0.2, ge=0, lt=0.5, description="Fraction trimmed from each end, per coordinate."
    )


class KrumParams(Params):
    f: int = Field(1, ge=0, description="Byzantine updates tolerated per round.")


class MultiKrumParams(Params):
    f: int = Field(1, ge=0, description="Byzantine updates tolerated per round.")
    m: int | None = Field(
        None, ge=1, description="Updates averaged; default n - f (n: updates in the round)."
    )


class BulyanParams(Params):
    f: int = Field(1, ge=0, description="Byzantine updates tolerated per round.")


class GeometricMedianParams(Params):
    nu: float = Field(1e-6, gt=0, description="Smoothing: distances below nu count as nu.")
    max_iter: int = Field(100, ge=1, description="Weiszfeld steps at most.")
    tol: float = Field(
        1e-6, ge=0, description="Stop when the objective improves by less than tol of itself."
    )
    weighted: bool = Field(
        False, description="Weight by training-set size as RFA does (default: unweighted)."
    )


def build_median(params: NoParams) -> Aggregator:
    def aggregate(updates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return coordinate_median(updates)

    return aggregate


def build_trimmed_mean(params: TrimmedMeanParams) -> Aggregator:
    def aggregate(updates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(updates, params.beta)

    return aggregate


class KrumSelection:
    """Krum (``m`` = 1) or Multi-Krum as a screening aggregator: the same aggregate as
    ``krum`` / ``multi_krum``, and which updates were selected (weight 1/m each; the
    others count as dropped in the detection matrix). Callable as a plain aggregator too."""

    def __init__(self, f: int, m: int | None, single: bool) -> None:
        self.f, self.m, self.single = f, m, single

    def _m(self, k: int) -> int:
        return 1 if self.single else self.m if self.m is not None else k - self.f

    def __call__(self, updates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        if self.single:
            return krum(updates, self.f)
        return multi_krum(updates, self.f, self._m(updates.shape[0]))

    def aggregate(
        self, updates: torch.Tensor, sizes: torch.Tensor, ctx: RoundContext, clients: list[int]
    ) -> Screening:
        delta = self(updates, sizes)  # raises the rule's own ValueError first
        m = self._m(updates.shape[0])
        # the order krum and multi_krum choose in (stable: ties to the lowest index)
        best = torch.argsort(krum_scores(updates, self.f), stable=True)[:m]
        kept = torch.zeros(updates.shape[0], dtype=torch.bool, device=updates.device)
        kept[best] = True
        return Screening(delta, kept.to(updates.dtype) / m, kept)


def build_krum(params: KrumParams) -> KrumSelection:
    return KrumSelection(params.f, None, single=True)


def build_multi_krum(params: MultiKrumParams) -> KrumSelection:
    return KrumSelection(params.f, params.m, single=False)


def build_bulyan(params: BulyanParams) -> Aggregator:
    def aggregate(updates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return bulyan(updates, params.f)

    return aggregate


def build_geometric_median(params: GeometricMedianParams) -> Aggregator:
    def aggregate(updates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        # Unweighted unless asked: a client could otherwise buy weight by claiming a
        # large dataset, which is what the rule is meant to resist.
        weights = sizes if params.weighted else None
        return geometric_median(updates, weights, params.nu, params.max_iter, params.tol).delta

    return aggregate


def _sampled(scenario: Scenario) -> int:
    return int(scenario.federation.m)


def check_trimmed_mean(params: TrimmedMeanParams, scenario: Scenario) -> list[str]:
    n = _sampled(scenario)
    # beta > 0 that trims nothing is almost certainly a mistake: the run would silently
    # be the unweighted mean, and its results reported as a trimmed mean.
    if params.beta > 0 and math.floor(params.beta * n) == 0:
        return [
            f"trimmed_mean trims floor(beta * n) = 0 updates per side: n = {n} sampled "
            f"clients, beta = {params.beta}; use beta >= 1/n or more clients"
        ]
    return []


def _krum_rule(rule: str, f: int, n: int) -> list[str]:
    if n <= 2 * f + 2:
        return [f"{rule} needs n > 2f + 2 updates per round: n = {n} sampled clients, f = {f}"]
    return []


def check_krum(params: KrumParams, scenario: Scenario) -> list[str]:
    return _krum_rule("krum", params.f, _sampled(scenario))


def check_multi_krum(params: MultiKrumParams, scenario: Scenario) -> list[str]:
    n = _sampled(scenario)
    problems = _krum_rule("multi_krum", params.f, n)
    if params.m is not None and params.m > n:
        problems.append(
            f"multi_krum needs m <= n updates per round: n = {n} sampled clients, m = {params.m}"
        )
    return problems


def check_bulyan(params: BulyanParams, scenario: Scenario) -> list[str]:
    n = _sampled(scenario)
    if n < 4 * params.f + 3:
        return [
            f"bulyan needs n >= 4f + 3 updates per round: n = {n} sampled clients, f = {params.f}"
        ]
    return []


@hookimpl
def testbed_register_aggregators(registry: KindRegistry) -> None:
    registry.add(
        "median",
        build_median,
        description="Coordinate-wise median, unweighted (Yin et al. 2018)",
    )
    registry.add(
        "trimmed_mean",
        build_trimmed_mean,
        params=TrimmedMeanParams,
        description="Coordinate-wise mean without the beta-fraction extremes (Yin et al. 2018)",
        check=check_trimmed_mean,
    )
    registry.add(
        "krum",
        build_krum,
        params=KrumParams,
        description="The update closest to its n - f - 2 neighbours (Blanchard et al. 2017)",
        check=check_krum,
    )
    registry.add(
        "multi_krum",
        build_multi_krum,
        params=MultiKrumParams,
        description="Mean of the m best updates by Krum score (Blanchard et al. 2017)",
        check=check_multi_krum,
    )
    registry.add(
        "bulyan",
        build_bulyan,
        params=BulyanParams,
        description="Iterated Krum, then trimmed mean around the median (El Mhamdi et al. 2018)",
        check=check_bulyan,
    )
    registry.add(
        "geometric_median",
        build_geometric_median,
        params=GeometricMedianParams,
        description="Geometric median by smoothed Weiszfeld, RFA (Pillutla et al. 2022)",
    )
