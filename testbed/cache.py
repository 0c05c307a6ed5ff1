"""Trained federations, cached across runs by a content hash of what training depends on.

An attack sweep, a changed threat model or a new report never retrains; any change to
the data, partition, model, federation, aggregator, DP, defences, seed or testbed version
gives a new key. Entries are plain tensors and lists, loaded with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from testbed import __version__
from testbed.scenario import Scenario, Task


def training_key(scenario: Scenario, task: Task, seed: int, device: torch.device) -> str:
    fed = scenario.federation.model_dump(mode="json", exclude={"device"})
    inputs = {
        "testbed": __version__,
        "data": task.data.model_dump(mode="json"),
        "partition": scenario.partition.model_dump(mode="json"),
        "model": scenario.model.model_dump(mode="json"),
        "federation": fed,
        # CPU and CUDA kernels round differently: their federations are not the same
        "device": device.type,
        # the engines are bitwise equal only at equal thread counts: each has its own entries
        "engine": scenario.engine.name,
        "aggregator": scenario.aggregator.model_dump(mode="json"),
        "dp": scenario.dp.model_dump(mode="json") if scenario.dp else None,
        "defences": [d.model_dump(mode="json") for d in scenario.defences],
        "seed": seed,
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class FederationCache:
    root: Path

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, not a failure
            return None

    def save(self, key: str, payload: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
