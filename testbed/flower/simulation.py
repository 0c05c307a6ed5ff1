"""A whole run inside Flower's simulation engine: the testbed run (training through the
testbed Strategy, then attacks and reports) is the ServerApp's main function; clients are
ClientApps on Ray actors with the scenario's per-client CPUs and GPUs."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from testbed.engines import Engine
from testbed.scenario import Scenario

T = TypeVar("T")


def backend_config(scenario: Scenario, device: torch.device) -> dict[str, Any]:
    eng = scenario.engine
    gpus = eng.client_gpus if device.type == "cuda" else 0.0
    init_args: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "include_dashboard": False,
        # Ray's default uses every core the OS reports; the simulated clients are then
        # packed by client_cpus.
        "num_cpus": os.cpu_count() or 1,
        **eng.ray_init_args,
    }
    return {
        "client_resources": {"num_cpus": eng.client_cpus, "num_gpus": gpus},
        "init_args": init_args,
    }


def simulate(scenario: Scenario, device: torch.device, body: Callable[[Engine], T]) -> T:
    """``body(engine)`` as the main function of a ServerApp in a Flower simulation with
    one SuperNode per client; its result, or its exception, comes back here."""
    from testbed.flower.client_app import app as client_app
    from testbed.flower.strategy import FlowerEngine
    from testbed.rundir import RunError

    outcome: dict[str, Any] = {}
    stop = threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            outcome["result"] = body(FlowerEngine(grid, scenario.engine.timeout_s, stop))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's per-round INFO lines would break the bars
    try:
        with warnings.catch_warnings():
            # Ray's tip about a future default for num_gpus=0 actors, printed at every start
            # amid the report; the behaviour it announces is not one a run relies on
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=scenario.federation.clients,
                backend_config=backend_config(scenario, device),
            )
    finally:
        flwr_log.setLevel(level)
        stop.set()  # a server thread still waiting for replies gives up instead of hanging
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RunError("Flower's simulation runtime stopped before the run finished")
    return outcome["result"]
