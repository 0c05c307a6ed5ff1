"""Drop client updates whose norm is an outlier: ||u_i|| > factor * median_j ||u_j||."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, Params
from testbed.state import ClientUpdate, RoundContext


class NormFilterParams(Params):
    factor: float = Field(3.0, gt=1, description="Drop updates above factor x median norm.")
    min_updates: int = Field(
        3, ge=2, description="Below this many updates the median says little: keep all."
    )


class NormFilter:
    def __init__(self, params: NormFilterParams) -> None:
        self.p = params
        self.dropped: list[dict[str, Any]] = []

    @hookimpl
    def testbed_before_aggregation(self, ctx: RoundContext, updates: list[ClientUpdate]) -> None:
        live = [u for u in updates if u.dropped is None]
        if len(live) < self.p.min_updates:
            return
        norms = torch.stack([torch.linalg.vector_norm(u.delta) for u in live])
        limit = float(norms.median()) * self.p.factor
        for u, n in zip(live, norms.tolist(), strict=True):
            if n > limit:
                u.dropped = f"norm_filter: norm {n:.3g} > {limit:.3g}"
                self.dropped.append({"round": ctx.round, "client": u.client_id, "norm": n})

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        record["norm_filter_dropped"] = [
            d["client"] for d in self.dropped if d["round"] == ctx.round
        ]


@hookimpl
def testbed_register_defences(registry: KindRegistry) -> None:
    registry.add(
        "norm_filter",
        NormFilter,
        params=NormFilterParams,
        description="Drop updates whose norm exceeds factor x the round's median (example plugin)",
    )
