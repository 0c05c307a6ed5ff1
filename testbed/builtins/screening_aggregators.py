"""Aggregators that screen the uploads and remember across rounds: thin plugins over
``testbed.robust_extra``.

Each factory returns an object with ``aggregate(updates, sizes, ctx, clients) ->
Screening`` (the aggregate, each row's weight, which rows it kept), so the engine can
record which uploads the rule dropped or down-weighted; ``clients`` are the client ids of
the rows. State kept between rounds (centred clipping's last aggregate, FoolsGold's
per-client histories) lives on the object, which the runner builds fresh per repeat and
checkpoints through ``state_dict`` / ``load_state_dict``, so ``--resume`` continues it
exactly. Randomness (FLAME's noise) comes from ``ctx.generator``. FLTrust declares a
``root_set`` (``testbed.server_data``): the engine carves it from the dataset before
partitioning and passes the round's ``server`` to ``aggregate``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, Params
from testbed.robust_extra import Screening, centred_clipping, flame, fltrust, foolsgold
from testbed.server_data import RootSet, ServerRound
from testbed.state import RoundContext


class CentredClippingParams(Params):
    tau: float = Field(1.0, gt=0, description="Clipping radius around the last aggregate.")
    iterations: int = Field(1, ge=1, description="L: clipping iterations (the paper: 1).")


class CentredClipping:
    """Centred clipping (Karimireddy, He & Jaggi 2021, ICML), centred on the previous
    round's aggregate (zero before the first round)."""

    def __init__(self, p: CentredClippingParams) -> None:
        self.p = p
        self.previous: torch.Tensor | None = None

    def aggregate(
        self, updates: torch.Tensor, sizes: torch.Tensor, ctx: RoundContext, clients: list[int]
    ) -> Screening:
        prev = self.previous if self.previous is not None else torch.zeros(updates.shape[1])
        result = centred_clipping(updates, prev, self.p.tau, self.p.iterations)
        self.previous = result.delta.detach().cpu().clone()
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["previous"]


class FLTrustParams(Params):
    root_size: int = Field(
        100, ge=1, description="Root set: images the server keeps from every client (paper: 100)."
    )
    root_sampling: Literal["stratified", "random"] = Field(
        "stratified",
        description="stratified: each class in its share of the dataset; random: uniform.",
    )
    epochs: int | None = Field(
        None, ge=1, description="Server's local epochs on the root set; default the clients'."
    )
    lr: float | None = Field(
        None, gt=0, description="Server's learning rate; default the clients'."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Server's batch size; default the clients'."
    )


class FLTrust:
    """FLTrust (Cao, Fang, Liu & Gong 2021, NDSS): each round the server trains the global
    model on its own clean root set, carved from the dataset before partitioning so that
    no client holds it, and weights every upload by ReLU(cos) with that update g_0, each
    rescaled to ||g_0|| (``testbed.robust_extra.fltrust``). No state between rounds."""

    def __init__(self, p: FLTrustParams) -> None:
        self.p = p
        self.root_set = RootSet(p.root_size, p.root_sampling, p.epochs, p.lr, p.batch_size)

    def aggregate(
        self,
        updates: torch.Tensor,
        sizes: torch.Tensor,
        ctx: RoundContext,
        clients: list[int],
        server: ServerRound,
    ) -> Screening:
        g0 = server.update().to(device=updates.device, dtype=updates.dtype)
        return fltrust(updates, g0)


class FlameParams(Params):
    noise_lambda: float = Field(
        0.001, ge=0, description="Noise std as a share of the median norm (paper: 0.001)."
    )
    min_cluster_size: int | None = Field(
        None, ge=2, description="HDBSCAN's min cluster size; default floor(k/2) + 1."
    )


class Flame:
    """FLAME (Nguyen et al. 2022, USENIX Security); no state between rounds."""

    def __init__(self, p: FlameParams) -> None:
        self.p = p

    def aggregate(
        self, updates: torch.Tensor, sizes: torch.Tensor, ctx: RoundContext, clients: list[int]
    ) -> Screening:
        g = ctx.generator("flame")
        return flame(updates, self.p.noise_lambda, g, self.p.min_cluster_size)


class FoolsGoldParams(Params):
    kappa: float = Field(1.0, gt=0, description="Confidence of the logit (paper: 1).")


class FoolsGold:
    """FoolsGold (Fung, Yoon & Beschastnikh 2020, RAID), with each client's summed update
    history kept across the rounds it took part in."""

    def __init__(self, p: FoolsGoldParams) -> None:
        self.p = p
        self.history: dict[int, torch.Tensor] = {}

    def aggregate(
        self, updates: torch.Tensor, sizes: torch.Tensor, ctx: RoundContext, clients: list[int]
    ) -> Screening:
        zero = torch.zeros(updates.shape[1], dtype=updates.dtype)
        rows = [self.history.get(c, zero).to(updates.device, updates.dtype) for c in clients]
        result, new_history = foolsgold(updates, torch.stack(rows), self.p.kappa)
        for c, h in zip(clients, new_history, strict=True):
            self.history[c] = h.detach().cpu().clone()
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(c): h for c, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {int(c): h for c, h in state["history"].items()}


@hookimpl
def testbed_register_aggregators(registry: KindRegistry) -> None:
    registry.add(
        "centred_clipping",
        CentredClipping,
        params=CentredClippingParams,
        description="Clip around the last aggregate (Karimireddy et al. 2021)",
    )
    registry.add(
        "fltrust",
        FLTrust,
        params=FLTrustParams,
        description="Trust by cosine with the server's root-set update (Cao et al. 2021)",
    )
    registry.add(
        "flame",
        Flame,
        params=FlameParams,
        description="HDBSCAN majority, median-norm clipping, noise (Nguyen et al. 2022)",
    )
    registry.add(
        "foolsgold",
        FoolsGold,
        params=FoolsGoldParams,
        description="Down-weight clients whose histories look alike (Fung et al. 2020)",
    )
