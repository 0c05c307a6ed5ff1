"""Records passed between the engine steps and the lifecycle hooks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from any keys; the same keys give the same seed on every machine."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g


@dataclass(frozen=True)
class RoundContext:
    """What every lifecycle hook may read about the current round."""

    seed: int
    round: int
    rounds: int
    n_clients: int
    sampled: tuple[int, ...]
    weights: dict[int, float]
    """Aggregation weight of each sampled client (training-set fraction, sums to 1)."""
    client_sampling: str = "fixed"
    """How ``sampled`` was drawn: 'fixed' (exactly m of N without replacement) or
    'poisson' (each client independently with ``sample_rate``); DP accounting needs it."""
    sample_rate: float = 1.0
    """m / N: the (expected) fraction of clients sampled per round."""
    client_sizes: tuple[int, ...] = ()
    """Every client's training-set size (public, as FedAvg's weights are), for DP-FedAvg's
    fixed-denominator estimator under Poisson sampling."""

    def generator(self, *keys: object) -> torch.Generator:
        """A generator private to this seed, round and the given keys."""
        return generator(self.seed, self.round, *keys)


@dataclass
class ClientUpdate:
    client_id: int
    delta: torch.Tensor
    n_train: int
    loss: float
    dropped: str | None = None
    info: dict[str, float] = field(default_factory=dict)
    """Facts hooks record about this update (e.g. its norm before clipping)."""


@dataclass
class Aggregate:
    delta: torch.Tensor
    included: list[int] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    """What the server noticed this round (dropped or clipped uploads), for the report."""
    weights: dict[int, float] = field(default_factory=dict)
    """Each included client's weight as a screening aggregator reports it (its meaning is
    the rule's); empty for plain aggregators."""
    rejected: list[int] = field(default_factory=list)
    """Included clients that a screening aggregator dropped or gave weight zero."""


@dataclass
class Broadcast:
    client_id: int
    weights: torch.Tensor


@dataclass
class InferenceBatch:
    client_id: int
    x: torch.Tensor
    generator: torch.Generator = field(default_factory=lambda: generator("unseeded"))
    """Private to the run's seed, the client and what the batch is for (training inputs,
    clean evaluation, scoring an attack's examples): a randomised input defence draws
    from it, never from a global RNG, so a run (even from a cached federation) is
    reproducible."""


ENGINE_KEYS = frozenset(
    {"round", "sampled", "included", "dropped", "events", "train_loss", "update_norm"}
    | {"screening", "malicious", "detection"}
)
"""Keys of a round record that the engine writes and the report relies on. The last three
are written only by screening aggregators and runs with compromised clients."""


def plain_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON-able Python (numpy and torch scalars and small arrays
    become numbers and lists); TypeError naming ``where`` for anything else."""
    import numpy as np

    if isinstance(value, np.generic | np.ndarray) and value.size <= 10_000:
        if np.iscomplexobj(value) or value.dtype.kind not in "biuf":
            raise TypeError(f"{where}: numpy {value.dtype} is not a plain number")
        return plain_value(value.tolist(), where)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[str(k)] = plain_value(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [plain_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor) and value.numel() <= 10_000 and not value.is_complex():
        return plain_value(value.detach().cpu().tolist(), where)
    raise TypeError(
        f"{where}: {type(value).__name__} is not a number, string, list or dict"
        + (" (or has more than 10,000 values)" if hasattr(value, "shape") else "")
    )
