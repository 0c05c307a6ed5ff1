"""What travels between the testbed Strategy and the ClientApps, as Flower records.

Weights go as one flat float32 array (an ``ArrayRecord``), everything else in a
``ConfigRecord``: scalars as themselves, structured data as UTF-8 JSON bytes (data
only, never pickles, so a site never runs code sent by the server).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

TRAIN_CONFIG = "testbed"
"""ConfigRecord key of the train instruction and of the reply's facts."""


def to_record(vec: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"vec": Array(vec.detach().cpu().contiguous().numpy())})


def from_record(rec: ArrayRecord, device: torch.device | str = "cpu") -> torch.Tensor:
    arr = np.asarray(rec["vec"].numpy())
    return torch.from_numpy(arr.copy()).to(device)


def pack(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def unpack(blob: Any) -> Any:
    return json.loads(bytes(blob).decode())


def client_states(objects: list[object], cid: int) -> list[Any]:
    """What each per-run plugin object keeps about one client between rounds (e.g. its
    DP-SGD accountant); None for objects that keep nothing per client."""
    return [o.client_state(cid) if hasattr(o, "client_state") else None for o in objects]


def load_client_states(objects: list[object], cid: int, states: list[Any]) -> None:
    for o, st in zip(objects, states, strict=True):
        if st is not None:
            o.load_client_state(cid, st)  # type: ignore[attr-defined]
