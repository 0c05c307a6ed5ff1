"""The built-in engines, registered through the same hook as a third party's: who trains
the sampled clients each round (see testbed/engines.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from pydantic import Field

from testbed import hookimpl
from testbed.batched import Batched
from testbed.engines import Engine, InProcess
from testbed.registry import KindRegistry, Params
from testbed.rundir import RunError
from testbed.scenario import Scenario

T = TypeVar("T")


class Direct:
    """Runs the whole run in this process with one engine object."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, scenario: Scenario, device: torch.device, body: Callable[[Engine], T]) -> T:
        return body(self.engine)


class FlowerSimulation:
    """The run as the main function of a Flower ServerApp, clients on Ray actors."""

    def run(self, scenario: Scenario, device: torch.device, body: Callable[[Engine], T]) -> T:
        try:  # imported here: Flower and Ray are an optional extra
            from testbed.flower.simulation import simulate
        except ImportError as exc:
            raise RunError(
                f"engine 'flower' needs the flower extra (pip install -e '.[flower]'): {exc}"
            ) from None
        return simulate(scenario, device, body)


class InProcessParams(Params):
    capture: Literal["none", "cuda-graph"] = Field(
        "none",
        description='"cuda-graph": plain local training replays one captured CUDA graph per '
        "run, faster where kernel launches bound the step (needs a CUDA device; GPU runs are "
        "not bitwise repeatable, so such a run has its own cache entries)",
    )


class BatchedParams(Params):
    dropout: Literal["exact", "stacked"] = Field(
        "exact",
        description='How a model with dropout is trained: "exact" client by client, equal '
        'to in-process; "stacked" batched too, each client drawing its own masks (not equal '
        "to in-process: another random stream, the same training in distribution)",
    )


@hookimpl
def testbed_register_engines(registry: KindRegistry) -> None:
    registry.add(
        "inprocess",
        lambda p: Direct(InProcess(capture=p.capture == "cuda-graph")),
        params=InProcessParams,
        description="Clients one after another here",
    )
    registry.add(
        "batched",
        lambda p: Direct(Batched(stacked_dropout=p.dropout == "stacked")),
        params=BatchedParams,
        description="All sampled clients as one stacked model (torch.func.vmap)",
    )
    registry.add(
        "flower",
        lambda p: FlowerSimulation(),
        description="Flower simulation engine (Ray); needs the flower extra",
    )
