"""The paper's DP: uplink clipping to C, then per-client Gaussian noise on the downlink.

Each client receives its own noisy copy of the aggregate (Darzi et al., Alg. 1, lines
6-7), which is why clients end with different models. The guarantee is client-level
in the zero-out sense (Kairouz et al. 2021, "Practical and private (deep) learning
without sampling or shuffling"): neighbouring federations differ in one client's clipped
updates being replaced by zero; clients' sizes (FedAvg's weights) are public. In round
r the size-weighted mean moves by at most c_r = p_r * C, p_r the largest weight among
the kept updates; the downlink noise has std s_r = z * C * p_r. The server sees the raw
uploads: no privacy against it. Derivation in docs/privacy.md; two placements:

``per_download`` (the paper, default). The server model w_r stays noise-free and every
client k receives w_r + n_{k,r}, n fresh each round. w_r is the running sum of all
rounds' aggregates, so neighbouring federations' downloads differ by up to
sum_{j<=r} c_j in round r: NOT a per-round Gaussian composition (the differences of
two downloads carry two noises, and nothing in a download is "old noise"). Given all
earlier downloads, every other client's update is a function of what it received, so
round r's N downloads are one Gaussian mechanism of std s_r / sqrt(N) on w_r, with
sensitivity sum_{j<=r} c_j; adaptive composition of Gaussian mechanisms (Dong, Roth &
Su 2022, Gaussian DP, Cor. 3.3) gives mu^2 = N * sum_r (sum_{j<=r} c_j)^2 / s_r^2,
i.e. N sum_r r^2 / z^2 for equal weights and full participation. That is the epsilon
reported; it holds against any set of recipients, one included (post-processing).
With one recipient the bound cannot drop the factor N in general: other clients' updates
carry what THEIR downloads told them about w_r into w_{r+1}. One pair of federations
(other clients' updates independent of their downloads) already needs the exact
Gaussian epsilon at mu_1 = mu / sqrt(N); the report gives that as a lower bound
(2 clients, C = 1, z = 2, 8 rounds: mu_1 = sqrt(204) / 2, epsilon 55 at 1e-5).
Sampling is conditioned on (it is data-independent), so no amplification is claimed.

``persistent``. Each client's noise stays in the model it continues from: client k
receives w_r + N_{k,r} with N_{k,r} = N_{k,r-1} + n_{k,r}, a random walk, and trains from
it as before. The downloads up to round r are then a post-processing of the per-round
releases a_r + n_{k,r} (a_r: the round's aggregate), whose sensitivity is c_r. The N
recipients' fresh noises make each round a Gaussian mechanism with multiplier z / sqrt(N)
(any set of recipients), composed over rounds by Opacus. Under Poisson client sampling
the aggregate is DP-FedAvg's fixed-denominator estimator with a fixed noise std, so the
round is a sampled Gaussian mechanism with rate q (amplification, Opacus' accountant).

After screening or a defence drops uploads, c_r and s_r use the weights of the updates
actually kept (the aggregator renormalises among them); which uploads were dropped is
treated as public.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from testbed import hookimpl
from testbed.numerics import clip_to_norm
from testbed.privacy import (
    ALL_RECIPIENTS,
    ONE_RECIPIENT,
    SERVER,
    accountant_sample_rate,
    cumulative_mu,
    fixed_denominator,
    gaussian_epsilon,
    opacus_epsilon,
    sampling_note,
    viewpoints,
)
from testbed.registry import KindRegistry, Params
from testbed.state import Aggregate, Broadcast, ClientUpdate, RoundContext, generator
from testbed.strict import check_noise_std


class PaperDPParams(Params):
    clip_norm: float = Field(gt=0, description="C: bound on each client's update L2 norm.")
    noise_multiplier: float = Field(
        ge=0, description="z: downlink noise std is z * C * max_i p_i (p_i: FedAvg weight)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (eps, delta).")
    accountant: Literal["rdp", "prv", "gdp"] = Field(
        "rdp", description="Opacus accountant (per-round composition, or the one Gaussian)."
    )
    noise_placement: Literal["per_download", "persistent"] = Field(
        "per_download",
        description="'per_download': fresh noise on a noise-free server model each round "
        "(the paper; epsilon grows with the square of the rounds). 'persistent': each "
        "client's noise stays in the model it continues from (a random walk), so "
        "per-round composition is valid. See docs/privacy.md.",
    )

    @model_validator(mode="after")
    def _drawable(self) -> PaperDPParams:
        check_noise_std(self.noise_multiplier * self.clip_norm, "noise_multiplier x clip_norm")
        return self


def _kept_weights(ctx: RoundContext, aggregate: Aggregate) -> dict[int, float]:
    """The FedAvg weights of the updates actually aggregated: ctx.weights covers every
    sampled client, the aggregator renormalises among the kept ones."""
    kept = {c: ctx.weights[c] for c in aggregate.included if c in ctx.weights}
    total = sum(kept.values())
    return {c: w / total for c, w in kept.items()} if total > 0 else {}


class PaperDP:
    name = "paper_dp"

    def __init__(self, p: PaperDPParams) -> None:
        self.p = p
        self.noise_std = 0.0
        self.rounds = 0
        self.n_recipients = 1
        self.sampling = ("fixed", 1.0)
        self.sensitivity: list[float] = []
        """per_download: c_r, each round's bound on one client's move of the mean."""
        self.stds: list[float] = []
        """per_download: s_r, each round's downlink noise std."""
        self.history: list[tuple[float, float, int]] = []
        """persistent: the Opacus history (noise multiplier, sample rate, steps)."""
        self.walk: dict[int, torch.Tensor] = {}
        """persistent: each client's accumulated noise (rebuilt from the seed on resume)."""
        self.walk_round = 0
        self.stds_by_round: list[float] = []

    @hookimpl
    def testbed_client_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        update.info["norm_before_clip"] = float(torch.linalg.vector_norm(update.delta))
        update.delta = clip_to_norm(update.delta, self.p.clip_norm)

    @hookimpl
    def testbed_after_aggregation(self, ctx: RoundContext, aggregate: Aggregate) -> None:
        z, c = self.p.noise_multiplier, self.p.clip_norm
        self.rounds += 1
        self.n_recipients = ctx.n_clients
        self.sampling = (ctx.client_sampling, ctx.sample_rate)
        poisson = self.p.noise_placement == "persistent" and ctx.client_sampling == "poisson"
        if poisson:
            # Fixed denominator and fixed std: who was sampled must not show in the output.
            scale, p_max = fixed_denominator(ctx.client_sizes, ctx.sample_rate, aggregate.included)
            aggregate.delta = aggregate.delta * scale
            self.noise_std = z * c * p_max
            sens = c * p_max
        else:
            kept = _kept_weights(ctx, aggregate)
            sens = c * max(kept.values(), default=0.0)
            if sens > 0:  # else nobody contributed: keep the last std (the sum still needs it)
                self.noise_std = z * c * max(kept.values())
        self.stds_by_round.append(self.noise_std)
        if self.p.noise_placement == "per_download":
            self.sensitivity.append(sens)
            self.stds.append(self.noise_std)
        elif sens > 0 or poisson:
            # N recipients' independent noises of std s: one Gaussian of std s / sqrt(N).
            rate = accountant_sample_rate(ctx.client_sampling, ctx.sample_rate)
            step = (z / math.sqrt(ctx.n_clients), rate, 1)
            if self.history and self.history[-1][:2] == step[:2]:
                self.history[-1] = (*step[:2], self.history[-1][2] + 1)
            else:
                self.history.append(step)

    def _noise(self, ctx: RoundContext, cid: int, like: torch.Tensor, rnd: int) -> torch.Tensor:
        # CPU generator of (seed, round, client): the same noise on every device, and
        # redrawable after a resume.
        g = generator(ctx.seed, rnd, self.name, cid)
        return torch.randn(like.shape, generator=g, dtype=like.dtype)

    def _rebuild_walk(self, ctx: RoundContext, like: torch.Tensor) -> None:
        """After a resume: redraw every client's past noises from the seed."""
        self.walk = {}
        for rnd, std in enumerate(self.stds_by_round[: ctx.round - 1], start=1):
            for cid in range(ctx.n_clients):
                prev = self.walk.get(cid, torch.zeros(like.shape, dtype=like.dtype))
                self.walk[cid] = prev + self._noise(ctx, cid, like, rnd) * std
        self.walk_round = ctx.round - 1

    @hookimpl
    def testbed_broadcast(self, ctx: RoundContext, broadcast: Broadcast) -> None:
        w = broadcast.weights
        if self.p.noise_placement == "per_download":
            if self.noise_std == 0:
                return
            noise = self._noise(ctx, broadcast.client_id, w, ctx.round)
            broadcast.weights = w + (noise * self.noise_std).to(w.device)
            return
        if self.walk_round < ctx.round - 1:
            self._rebuild_walk(ctx, w)
        cid = broadcast.client_id
        prev = self.walk.get(cid, torch.zeros(w.shape, dtype=w.dtype))
        if self.noise_std > 0:
            prev = prev + self._noise(ctx, cid, w, ctx.round) * self.noise_std
        self.walk[cid] = prev
        if cid == ctx.n_clients - 1:
            self.walk_round = ctx.round
        broadcast.weights = w + prev.to(w.device)

    def client_state(self, cid: int) -> None:
        """Nothing per client: the client side (uplink clipping) keeps no state."""
        return None

    def load_client_state(self, cid: int, state: None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the privacy accounting after a crash (the
        persistent noise is redrawn from the seed, not stored)."""
        return {
            "rounds": self.rounds,
            "noise_std": self.noise_std,
            "n_recipients": self.n_recipients,
            "sampling": list(self.sampling),
            "sensitivity": list(self.sensitivity),
            "stds": list(self.stds),
            "history": [list(h) for h in self.history],
            "stds_by_round": list(self.stds_by_round),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.noise_std = float(state["noise_std"])
        self.n_recipients = int(state["n_recipients"])
        self.sampling = (str(state["sampling"][0]), float(state["sampling"][1]))
        self.sensitivity = [float(x) for x in state["sensitivity"]]
        self.stds = [float(x) for x in state["stds"]]
        self.history = [(float(z), float(q), int(k)) for z, q, k in state["history"]]
        self.stds_by_round = [float(x) for x in state["stds_by_round"]]
        self.walk, self.walk_round = {}, 0

    def mu(self) -> float:
        """per_download: GDP mu against all recipients colluding (see the module doc)."""
        return math.sqrt(self.n_recipients) * cumulative_mu(self.sensitivity, self.stds)

    def epsilon(self) -> float:
        """The reported epsilon: against any set of recipients (one included)."""
        if self.rounds == 0:
            return 0.0
        if self.p.noise_multiplier == 0:
            return math.inf
        if self.p.noise_placement == "persistent":
            return opacus_epsilon(self.p.accountant, self.p.delta, tuple(self.history))
        mu = self.mu()
        if mu == 0:
            return 0.0
        # One Gaussian mechanism with noise multiplier 1 / mu, through Opacus' accountant.
        return opacus_epsilon(self.p.accountant, self.p.delta, ((1 / mu, 1.0, 1),))

    def epsilon_one_pair(self) -> float:
        """per_download: the exact epsilon one pair of federations needs against one
        recipient (a lower bound on the truth, see the module doc)."""
        mu1 = cumulative_mu(self.sensitivity, self.stds)
        return gaussian_epsilon(mu1, self.p.delta)

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        record[self.name] = {"noise_std": self.noise_std, "epsilon": self.epsilon()}

    @hookimpl
    def testbed_privacy_spent(self) -> dict[str, Any]:
        eps = self.epsilon()
        amplified = self.p.noise_placement == "persistent" and self.sampling[0] == "poisson"
        views = {SERVER: math.inf, ALL_RECIPIENTS: eps, ONE_RECIPIENT: eps}
        note = (
            "holds against any set of recipients (one included), not against the server, "
            "which sees the raw uploads"
        )
        out: dict[str, Any] = {}
        if self.p.noise_placement == "per_download" and self.rounds:
            out["epsilon_one_pair_lower_bound"] = self.epsilon_one_pair()
            note += (
                "; fresh noise on a noise-free model each round: sensitivity grows with the "
                "rounds; one pair of federations already needs epsilon "
                f"{out['epsilon_one_pair_lower_bound']:.4g} against one recipient"
            )
        return {
            "mechanism": self.name,
            "level": "client",
            "against": ALL_RECIPIENTS,
            "sampling": sampling_note(*self.sampling, amplified=amplified),
            "epsilon": eps,
            "epsilon_by_viewpoint": viewpoints(views),
            **out,
            "delta": self.p.delta,
            "accountant": self.p.accountant,
            "clip_norm": self.p.clip_norm,
            "noise_multiplier": self.p.noise_multiplier,
            "noise_placement": self.p.noise_placement,
            "rounds_accounted": self.rounds,
            "note": note,
        }


@hookimpl
def testbed_register_dp_mechanisms(registry: KindRegistry) -> None:
    registry.add(
        "paper_dp",
        PaperDP,
        params=PaperDPParams,
        description="Uplink clipping to C + per-client downlink Gaussian noise (Darzi et al.)",
    )
