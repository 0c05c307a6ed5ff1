"""Execution engines: who runs the sampled clients' local training in each round.

The in-process engine (default) trains them one after another in this process. The
Flower engine (`testbed.flower`) sends them to Flower ClientApps and aggregates through a
Flower Strategy; both call the same `client_step` and `finish_round`, so the same plugin
hooks run on both and a scenario gives the same federation on either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from testbed.captured import CapturedSGD
from testbed.federation import Aggregator, FederationState, UpdatePolicy, run_round
from testbed.local_training import ClientData, LocalConfig, Trainer, local_sgd
from testbed.pluginmanager import Host
from testbed.rundir import RunError
from testbed.scenario import Scenario, Task

RoundStep = Callable[[FederationState, Callable[[int], None]], FederationState]
"""(state, on_client_done) -> state after one more round."""


@dataclass(frozen=True)
class TrainingSetup:
    """One (task, seed) federation as the runner prepared it."""

    scenario: Scenario
    task: Task
    seed: int
    device: torch.device
    data_root: Path | None
    host: Host
    model: nn.Module
    clients: list[ClientData]
    cfg: LocalConfig
    aggregator: Aggregator
    policy: UpdatePolicy
    per_run: list[object]
    """The run's DP mechanism and defence objects, registered with the host."""
    threat: Any = None
    """The compromised clients and their attacks (``testbed.poisoning_run.Threat``), if any."""
    server: Any = None
    """The server's root set (``testbed.server_data.ServerData``), if the aggregator
    declares one; both engines use it in the server's process."""


class Engine(Protocol):
    name: str

    def round_step(self, setup: TrainingSetup) -> RoundStep: ...


class InProcess:
    """Engine "inprocess"; with ``capture`` its plain local training replays one CUDA graph
    per run (`testbed.captured`)."""

    name = "inprocess"

    def __init__(self, *, capture: bool = False) -> None:
        self.capture = capture

    def round_step(self, setup: TrainingSetup) -> RoundStep:
        fed = setup.scenario.federation
        trainer: Trainer = local_sgd
        if self.capture:
            if setup.device.type != "cuda":
                raise RunError(
                    f'engine inprocess with capture = "cuda-graph" needs a CUDA device; this '
                    f"run's device is {setup.device} (set federation.device or drop the param)"
                )
            trainer = CapturedSGD(capture=True)

        def step(state: FederationState, on_client_done: Callable[[int], None]) -> FederationState:
            return run_round(
                state, setup.model, setup.clients, setup.cfg, setup.aggregator, setup.host.hook,
                seed=setup.seed, rounds=fed.rounds, m=fed.m, policy=setup.policy,
                on_client_done=on_client_done, threat=setup.threat,
                sampling=fed.client_sampling, server=setup.server, trainer=trainer,
            )  # fmt: skip

        return step
