"""Trained federations, cached across runs by a content hash of what training depends on.

An attack sweep, a changed threat model, an inference-only defence or a new report never
retrains. The key covers everything training reads: the decoded data's content (not its
path), the partition (and the server's root set carved before it), model, federation,
aggregator, DP, the defences that act during training, the seed, and the content of
testbed's code and of every loaded plugin module.

An entry is a checksum line followed by a ``torch.save`` blob (plain tensors and lists,
loaded with weights_only=True). A damaged, foreign or implausible entry (bad checksum,
wrong shapes, non-finite weights) is discarded with a warning and the federation is
retrained: the cache can cost time, never correctness. The host's float path is not in the
key (the same computation, rounded in another order): an entry records where it was
trained, and a run that uses one from another host says so (testbed/repeat.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from testbed.scenario import Scenario, Task

FORMAT = b"testbed-federation-cache/2"


def training_key(
    scenario: Scenario,
    task: Task,
    seed: int,
    device: torch.device,
    *,
    data: str,
    code: dict[str, str],
    training_defences: list[dict[str, Any]],
    threat: dict[str, Any] | None = None,
    root_set: dict[str, Any] | None = None,
) -> str:
    """``data``: the dataset's content fingerprint; ``code``: module -> source digest;
    ``training_defences``: the defences that act during training (the others only change
    inference, which is recomputed from the cached weights); ``threat``: the poisoning
    attacks and compromised clients, None without poisoning (the key is then unchanged);
    ``root_set``: the server's root set (``RootSet.key()``), which the clients' data is
    carved around, None without one (the key is then unchanged)."""
    fed = scenario.federation.model_dump(mode="json", exclude={"device"})
    inputs = {
        "data": {"spec": task.data.model_dump(mode="json"), "content": data},
        "partition": scenario.partition.model_dump(mode="json"),
        "model": scenario.model.model_dump(mode="json"),
        "federation": fed,
        # CPU and CUDA kernels round differently: their federations are not the same
        "device": device.type,
        # the engines are bitwise equal only at equal thread counts: each has its own entries
        "engine": scenario.engine.name,
        "aggregator": scenario.aggregator.model_dump(mode="json"),
        "dp": scenario.dp.model_dump(mode="json") if scenario.dp else None,
        "defences": training_defences,
        "seed": seed,
        "code": code,
    }
    if threat is not None:
        inputs["threat"] = threat
    if root_set is not None:
        inputs["root_set"] = root_set
    if scenario.engine.params:  # "stacked" dropout trains another federation (see batched.py)
        inputs["engine_params"] = scenario.engine.params
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class BadEntry(Exception):
    """A cache entry that must not be used; the message says why."""


def check_entry(payload: Any, *, clients: int, rounds: int, numel: int) -> None:
    """Raise BadEntry unless ``payload`` is a plausible finished federation of this shape."""
    if not isinstance(payload, dict):
        raise BadEntry("not a federation record")
    missing = {"global", "clients", "history", "round_s", "privacy"} - payload.keys()
    if missing:
        raise BadEntry(f"missing {', '.join(sorted(missing))}")
    weights = {"global": payload["global"]}
    cw = payload["clients"]
    if not isinstance(cw, dict) or sorted(cw) != list(range(clients)):
        raise BadEntry(f"client weights are not for clients 0..{clients - 1}")
    weights.update({f"client {c}": w for c, w in cw.items()})
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor) or w.shape != (numel,) or not w.is_floating_point():
            raise BadEntry(f"{name}: not a float vector of {numel} weights")
        if not bool(torch.isfinite(w).all()):
            raise BadEntry(f"{name}: non-finite weights")
    for key in ("history", "round_s"):
        if not isinstance(payload[key], list) or len(payload[key]) != rounds:
            raise BadEntry(f"{key}: not {rounds} rounds")


@dataclass(frozen=True)
class FederationCache:
    root: Path

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry, None if there is none; BadEntry if there is one that must not be used
        (the caller warns, retrains and overwrites it)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BadEntry(f"unreadable: {exc}") from None
        head, _, blob = raw.partition(b"\n")
        fmt, _, digest = head.partition(b" ")
        if fmt != FORMAT:
            raise BadEntry("not a testbed cache entry of this version")
        if hashlib.sha256(blob).hexdigest().encode() != digest:
            raise BadEntry("checksum mismatch (the file was changed or damaged)")
        try:
            return torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as exc:  # a checksum-valid but unloadable blob: written by other code
            raise BadEntry(f"cannot load: {type(exc).__name__}") from None

    def save(self, key: str, payload: dict[str, Any]) -> str | None:
        """Store the entry atomically; why it could not be stored (an unwritable or full
        cache folder), else None. A cache that cannot be written costs the next run its
        training, never this run its results."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        blob = buf.getvalue()
        path = self._path(key)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(
                FORMAT + b" " + hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob
            )
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return f"{exc.filename}: {exc.strerror}"
        return None

    def discard(self, key: str) -> None:
        # a read-only cache folder keeps its bad entry; load() rejects it again next time
        with contextlib.suppress(OSError):
            self._path(key).unlink(missing_ok=True)
