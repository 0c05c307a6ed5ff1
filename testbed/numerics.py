"""Pure numerical functions on flat update vectors, tested on hand-computed arrays."""

from __future__ import annotations

import torch


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg: sum_i w_i * u_i with w normalised to sum to one. updates: k x d."""
    if updates.ndim != 2 or weights.shape != (updates.shape[0],):
        raise ValueError("weighted_mean needs updates k x d and k weights")
    w = weights.to(updates.dtype)
    total = w.sum()
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return (w / total) @ updates


def clip_to_norm(v: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale v down so that its L2 norm is at most max_norm (unchanged if already inside)."""
    norm = torch.linalg.vector_norm(v)
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return v * scale
