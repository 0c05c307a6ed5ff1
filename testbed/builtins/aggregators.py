"""FedAvg, weighted by training-set size (McMahan et al. 2017; paper Sec. II)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from testbed import hookimpl
from testbed.numerics import weighted_mean
from testbed.registry import KindRegistry, NoParams


def build_fedavg(params: NoParams) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return weighted_mean


@hookimpl
def testbed_register_aggregators(registry: KindRegistry) -> None:
    registry.add(
        "fedavg", build_fedavg, description="Mean of the updates weighted by training-set size"
    )
