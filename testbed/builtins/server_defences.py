"""Server-side defences: norm bounding (Sun et al. 2019) and central DP with fixed
clipping on the server (as Flower's ``DifferentialPrivacyServerSideFixedClipping``).

Both act in ``testbed_before_aggregation`` (clip each update the server received) and
``testbed_after_aggregation`` (Gaussian noise on the aggregate). Noise is drawn on the
CPU from ``ctx.generator`` and then moved, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from opacus.accountants import create_accountant
from pydantic import Field

from testbed import hookimpl
from testbed.numerics import clip_to_norm
from testbed.registry import KindRegistry, Params
from testbed.state import Aggregate, ClientUpdate, RoundContext


def _gaussian_like(v: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(v.shape, generator=g, dtype=v.dtype) * std).to(v.device)


# --------------------------------------------------------------------------------------
# Norm bounding
# --------------------------------------------------------------------------------------


class NormBoundParams(Params):
    max_norm: float = Field(gt=0, description="M: bound on each update's L2 norm.")
    noise_std: float = Field(
        0.0, ge=0, description="Std of Gaussian noise on the aggregate ('weak DP'); 0: none."
    )


class NormBound:
    """Norm bounding against backdoors (Sun et al. 2019, "Can you really backdoor
    federated learning?"): the server scales every received update down to norm at most
    M, limiting how far one boosted update can move the model; optional Gaussian noise
    on the aggregate is the paper's "weak differential privacy". The noise has no privacy
    accounting: its std is a free parameter, not derived from M.
    """

    name = "norm_bound"

    def __init__(self, p: NormBoundParams) -> None:
        self.p = p
        self.clipped: list[int] = []
        self.considered = 0

    @hookimpl
    def testbed_before_aggregation(self, ctx: RoundContext, updates: list[ClientUpdate]) -> None:
        self.clipped = []
        self.considered = 0
        for u in updates:
            if u.dropped is not None:
                continue
            self.considered += 1
            norm = float(torch.linalg.vector_norm(u.delta))
            u.info["norm_before_bound"] = norm
            if norm > self.p.max_norm:
                u.delta = clip_to_norm(u.delta, self.p.max_norm)
                self.clipped.append(u.client_id)

    @hookimpl
    def testbed_after_aggregation(self, ctx: RoundContext, aggregate: Aggregate) -> None:
        if self.p.noise_std > 0:
            g = ctx.generator(self.name)
            aggregate.delta = aggregate.delta + _gaussian_like(aggregate.delta, self.p.noise_std, g)

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        record[self.name] = {
            "clipped": len(self.clipped),
            "clipped_clients": list(self.clipped),
            "updates": self.considered,
            "max_norm": self.p.max_norm,
            "noise_std": self.p.noise_std,
        }


# --------------------------------------------------------------------------------------
# Central DP, server-side fixed clipping
# --------------------------------------------------------------------------------------


class CentralDPParams(Params):
    clip_norm: float = Field(gt=0, description="C: the server clips each update to norm C.")
    noise_multiplier: float = Field(
        ge=0, description="z: noise std on the aggregate is z * C / m (m: updates averaged)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (eps, delta).")
    accountant: Literal["rdp", "prv", "gdp"] = Field(
        "rdp", description="Opacus accountant composing the rounds."
    )


class CentralDP:
    """Central DP with server-side fixed clipping, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (McMahan et al. 2018, DP-FedAvg).

    The server clips every received update to norm C, the aggregator combines them, and
    the server adds Gaussian noise of std z * C / m to the aggregate, m being the number
    of updates averaged (the sampled clients, fewer if a defence dropped some). The
    rounds are composed by an Opacus accountant with noise multiplier z and client
    sampling rate m / N; the guarantee is client-level and, unlike ``paper_dp``, holds
    for everything the server publishes, colluding recipients included.

    Assumption, stated honestly: z * C / m is calibrated to the *uniform* mean of the m
    clipped updates, whose sensitivity to one client is C / m; Flower makes the same
    assumption. testbed's FedAvg is weighted by training-set size, so one client's
    influence is p_i * C with p_i its weight, which exceeds C / m when sizes differ; the
    noise then corresponds to a smaller effective multiplier z / (m * max_i p_i), which
    each round's record reports as ``noise_multiplier_if_size_weighted``. The epsilon
    reported uses z, i.e. it is exact for an unweighted mean (equal client sizes) and
    optimistic otherwise. Robust aggregators (median, Krum, ...) have different
    sensitivities; the epsilon does not apply to them.

    The server sees the raw updates: this protects the published model, not the uploads.
    """

    name = "central_dp"

    def __init__(self, p: CentralDPParams) -> None:
        self.p = p
        self.accountant = create_accountant(p.accountant)
        self.noise_std = 0.0
        self.effective_z = p.noise_multiplier
        self.clipped = 0
        self.rounds = 0

    @hookimpl
    def testbed_before_aggregation(self, ctx: RoundContext, updates: list[ClientUpdate]) -> None:
        self.clipped = 0
        for u in updates:
            if u.dropped is not None:
                continue
            norm = float(torch.linalg.vector_norm(u.delta))
            # Same key as paper_dp's uplink clipping, so the round record's update_norm
            # shows what the client sent rather than the clipped update.
            u.info["norm_before_clip"] = norm
            if norm > self.p.clip_norm:
                u.delta = clip_to_norm(u.delta, self.p.clip_norm)
                self.clipped += 1

    @hookimpl
    def testbed_after_aggregation(self, ctx: RoundContext, aggregate: Aggregate) -> None:
        # A defence that dropped updates leaves a mean over fewer of them, which one
        # client moves further (C / k); dividing by k keeps the multiplier at z.
        m = len(aggregate.included) or len(ctx.sampled)
        # z * C / m assumes the uniform mean Flower uses; testbed's FedAvg is size-weighted,
        # so record the multiplier that noise amounts to for the weights actually used.
        self.noise_std = self.p.noise_multiplier * self.p.clip_norm / m
        weights = [ctx.weights[c] for c in aggregate.included if c in ctx.weights]
        if weights and self.p.noise_multiplier > 0:
            p_max = max(weights) / sum(weights)
            self.effective_z = self.p.noise_multiplier / (m * p_max)
        else:
            self.effective_z = self.p.noise_multiplier
        self.rounds += 1
        if self.p.noise_multiplier == 0:
            return
        g = ctx.generator(self.name)
        aggregate.delta = aggregate.delta + _gaussian_like(aggregate.delta, self.noise_std, g)
        self.accountant.step(
            noise_multiplier=self.p.noise_multiplier,
            sample_rate=len(ctx.sampled) / ctx.n_clients,
        )

    def epsilon(self) -> float:
        if self.p.noise_multiplier == 0:
            return float("inf")
        if self.rounds == 0:
            return 0.0
        with warnings.catch_warnings():
            # With tiny noise the optimum sits at Opacus' smallest RDP order; the epsilon is
            # then huge either way, and the report shows it.
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return float(self.accountant.get_epsilon(delta=self.p.delta))

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        record[self.name] = {
            "noise_std": self.noise_std,
            "epsilon": self.epsilon(),
            "clipped": self.clipped,
            "noise_multiplier_if_size_weighted": self.effective_z,
        }

    @hookimpl
    def testbed_privacy_spent(self) -> dict[str, Any]:
        return {
            "mechanism": self.name,
            "level": "client",
            "epsilon": self.epsilon(),
            "delta": self.p.delta,
            "accountant": self.p.accountant,
            "clip_norm": self.p.clip_norm,
            "noise_multiplier": self.p.noise_multiplier,
            "rounds_accounted": self.rounds,
            "note": (
                "noise calibrated to the unweighted mean of the clipped updates (as Flower); "
                "optimistic for size-weighted FedAvg with unequal client sizes"
            ),
        }


@hookimpl
def testbed_register_defences(registry: KindRegistry) -> None:
    registry.add(
        "norm_bound",
        NormBound,
        params=NormBoundParams,
        description="Server clips each update to norm M, optional noise (Sun et al. 2019)",
    )


@hookimpl
def testbed_register_dp_mechanisms(registry: KindRegistry) -> None:
    registry.add(
        "central_dp",
        CentralDP,
        params=CentralDPParams,
        description="Server-side fixed clipping + Gaussian noise z*C/m on the aggregate (Flower)",
    )
