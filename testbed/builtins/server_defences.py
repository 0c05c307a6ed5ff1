"""Server-side defences: norm bounding (Sun et al. 2019) and central DP with fixed
clipping on the server (as Flower's ``DifferentialPrivacyServerSideFixedClipping``).

Both act in ``testbed_before_aggregation`` (clip each update the server received) and
``testbed_after_aggregation`` (Gaussian noise on the aggregate). Noise is drawn on the
CPU from ``ctx.generator`` and then moved, so a seed gives the same noise on any device.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from testbed import hookimpl
from testbed.numerics import clip_to_norm
from testbed.privacy import (
    ALL_RECIPIENTS,
    ONE_RECIPIENT,
    PUBLISHED_MODEL,
    SERVER,
    accountant_sample_rate,
    fixed_denominator,
    opacus_epsilon,
    sampling_note,
    viewpoints,
)
from testbed.registry import KindRegistry, Params
from testbed.state import Aggregate, ClientUpdate, RoundContext
from testbed.strict import check_noise_std


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

    @model_validator(mode="after")
    def _drawable(self) -> NormBoundParams:
        check_noise_std(self.noise_std, "noise_std")
        return self


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

    @model_validator(mode="after")
    def _drawable(self) -> CentralDPParams:
        check_noise_std(self.noise_multiplier * self.clip_norm, "noise_multiplier x clip_norm")
        return self


class CentralDP:
    """Central DP with server-side fixed clipping, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (McMahan et al. 2018, DP-FedAvg).

    The server clips every received update to norm C, the aggregator combines them, and
    the server adds Gaussian noise to the aggregate. Everyone, colluding recipients
    included, sees only that noisy model (the noise stays in it), so the rounds compose
    by adaptive composition (Opacus' accountant); the guarantee is client-level
    (add/remove or zero out one client's updates). The server sees the raw updates: this
    protects the published model, not the uploads.

    Fixed-size client sampling (m of N without replacement): noise of std z * C / k on the
    mean of the k kept updates, composed with sample rate 1: no amplification is claimed,
    none being proven for this sampling here. Assumption, stated honestly: z * C / k is
    calibrated to the *uniform* mean, whose sensitivity to one client is C / k; Flower
    makes the same assumption. testbed's FedAvg is weighted by training-set size, so one
    client's influence is p_i * C, more than C / k when sizes differ; the noise then
    corresponds to the smaller multiplier z / (k * max_i p_i), which each round's record
    reports as ``noise_multiplier_if_size_weighted``. The epsilon uses z: exact for equal
    client sizes, optimistic otherwise.

    Poisson client sampling (each client with q = m / N): DP-FedAvg's fixed-denominator
    estimator sum_k n_k u_k / (q W) (W: all clients' data) with noise of fixed std
    z * C * max_k n_k / (q W), added every round, even when nobody was sampled. One
    client then moves the output by at most that std / z whether or not others were
    sampled, so each round is the sampled Gaussian mechanism (Mironov, Talwar & Zhang
    2019) that Opacus' accountant composes with rate q; exact for size weighting.

    Robust aggregators (median, Krum, ...) have other sensitivities; the epsilon does not
    apply to them.
    """

    name = "central_dp"

    def __init__(self, p: CentralDPParams) -> None:
        self.p = p
        self.noise_std = 0.0
        self.effective_z = p.noise_multiplier
        self.clipped = 0
        self.rounds = 0
        self.history: list[tuple[float, float, int]] = []
        self.sampling = ("fixed", 1.0)

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
        z, c = self.p.noise_multiplier, self.p.clip_norm
        self.rounds += 1
        self.sampling = (ctx.client_sampling, ctx.sample_rate)
        if ctx.client_sampling == "poisson":
            scale, p_max = fixed_denominator(ctx.client_sizes, ctx.sample_rate, aggregate.included)
            aggregate.delta = aggregate.delta * scale
            self.noise_std = z * c * p_max
            self.effective_z = z
        else:
            # A defence that dropped updates leaves a mean over fewer of them, which one
            # client moves further (C / k); dividing by k keeps the multiplier at z.
            k = len(aggregate.included)
            if k == 0:  # nothing aggregated: no client influenced this round
                self.noise_std, self.effective_z = 0.0, z
                return
            self.noise_std = z * c / k
            # z * C / k assumes the uniform mean Flower uses; testbed's FedAvg is
            # size-weighted: record the multiplier that noise amounts to for those weights.
            weights = [ctx.weights[i] for i in aggregate.included if i in ctx.weights]
            self.effective_z = z / (k * max(weights) / sum(weights)) if weights else z
        if z == 0:
            return
        g = ctx.generator(self.name)
        aggregate.delta = aggregate.delta + _gaussian_like(aggregate.delta, self.noise_std, g)
        step = (z, accountant_sample_rate(*self.sampling), 1)
        if self.history and self.history[-1][:2] == step[:2]:  # as Opacus' step merges
            self.history[-1] = (*step[:2], self.history[-1][2] + 1)
        else:
            self.history.append(step)

    def epsilon(self) -> float:
        if self.p.noise_multiplier == 0:
            return float("inf")
        return opacus_epsilon(self.p.accountant, self.p.delta, tuple(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "history": [list(h) for h in self.history],
            "sampling": list(self.sampling),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.history = [(float(z), float(q), int(k)) for z, q, k in state["history"]]
        self.sampling = (str(state["sampling"][0]), float(state["sampling"][1]))

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
        eps = self.epsilon()
        poisson = self.sampling[0] == "poisson"
        note = "the server sees the raw uploads"
        if not poisson:
            note += (
                "; noise calibrated to the unweighted mean of the clipped updates (as "
                "Flower): optimistic for size-weighted FedAvg with unequal client sizes"
            )
        return {
            "mechanism": self.name,
            "level": "client",
            "against": PUBLISHED_MODEL,
            "sampling": sampling_note(*self.sampling, amplified=poisson),
            "epsilon": eps,
            "epsilon_by_viewpoint": viewpoints(
                {SERVER: float("inf"), ONE_RECIPIENT: eps, ALL_RECIPIENTS: eps}
            ),
            "delta": self.p.delta,
            "accountant": self.p.accountant,
            "clip_norm": self.p.clip_norm,
            "noise_multiplier": self.p.noise_multiplier,
            "rounds_accounted": self.rounds,
            "note": note,
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
