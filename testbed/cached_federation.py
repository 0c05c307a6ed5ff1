"""A trained federation's deployed models and client data, from the federation cache.

A run of the scenario with no attacks trains the federation or, usually, finds it in the
cache; its metrics name the cache key, and the weights are loaded from that entry. Tools
that study one federation (``testbed search``) never train one of their own, so what they
score is exactly what a run of the scenario scored.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from testbed.assemble import build_model, make_clients
from testbed.builtins.dataset_cache import cache_dir
from testbed.cache import BadEntry, FederationCache
from testbed.local_training import set_weights
from testbed.pluginmanager import Host
from testbed.rundir import RunError
from testbed.runner import resolve_device, run_scenario
from testbed.scenario import Evaluation, Scenario
from testbed.transfer import deploy


@dataclass
class CachedFederation:
    """The deployed models and client data of one (task, seed), from the cache."""

    deployed: list[Any]
    clients: list[Any]
    classes: tuple[str, ...]
    seed: int
    device: torch.device
    cache_hit: bool
    key: str
    """The federation cache key: which trained federation the study's trials scored."""
    trained_on: dict[str, Any] | None = None
    """The host a cached federation was trained on, where it is not this one."""


def load_federation(
    scenario: Scenario, host: Host, task_name: str, data_root: Path | None
) -> CachedFederation:
    """Train (or find in the cache) the federation of the first seed through the runner
    with no attacks, then load the cache entry its metrics name."""
    seed = scenario.seeds()[0]
    task = next(t for t in scenario.task_list() if t.name == task_name)
    bare = scenario.model_copy(
        update={
            "attacks": [],
            "outsider": None,
            "evaluation": Evaluation(repeats=1, seeds=[seed]),
            "report": scenario.report.model_copy(update={"plots": False, "save_weights": False}),
            "data": task.data if scenario.data is not None else None,
            "tasks": [] if scenario.data is not None else [task],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_scenario(
            bare, host, data_root=data_root, out=Path(tmp) / "run", show_progress=False
        ).metrics
    cache = metrics["tasks"][task_name]["repeats"][0]["cache"]
    if not_stored := cache.get("not_stored"):  # the search reads its models from the cache
        raise RunError(
            f"the search needs the federation cache, which could not be written ({not_stored})"
        )
    try:
        entry = FederationCache(cache_dir() / "federations").load(cache["key"])
    except BadEntry as exc:
        raise RunError(f"federation cache entry {cache['key']}: {exc}") from None
    if entry is None:
        raise RunError(f"federation cache entry {cache['key']} vanished after training")
    device = resolve_device(scenario.federation.device)
    ds = host.registry.build("datasets", task.data.name, task.data.params, data_root=data_root)
    finals = []
    for cid in range(scenario.federation.clients):
        m = build_model(scenario, host, ds, seed).to(device)
        set_weights(m, entry["clients"][cid].to(device))
        finals.append(m)
    clients = make_clients(ds, scenario, host, seed, device)
    classes = tuple(ds.classes)
    return CachedFederation(
        deploy(finals), clients, classes, seed, device, cache["hit"], cache["key"],
        cache.get("trained_on"),
    )  # fmt: skip
