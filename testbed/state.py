"""Records passed between the engine steps and the lifecycle hooks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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


@dataclass
class Broadcast:
    client_id: int
    weights: torch.Tensor


@dataclass
class InferenceBatch:
    client_id: int
    x: torch.Tensor
