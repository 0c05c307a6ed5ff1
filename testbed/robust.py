"""Byzantine-robust aggregation rules: pure functions on a k x d tensor of updates.

Every rule here is unweighted by design: it treats the k updates as k votes and ignores
the clients' training-set sizes, as in the papers. Weighting by size would let one
client inflate its say simply by claiming a large dataset, which is what these rules are
meant to resist. The plugins in ``testbed/builtins/robust_aggregators.py`` are thin
wrappers around these functions.
"""

from __future__ import annotations

import math

import torch


def _check_updates(updates: torch.Tensor, rule: str) -> int:
    if updates.ndim != 2 or updates.shape[0] == 0:
        shape = tuple(updates.shape)
        raise ValueError(f"{rule} needs updates k x d with k >= 1, got shape {shape}")
    return int(updates.shape[0])


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018). Unweighted: training-set sizes are ignored.

    For even k the median is the mean of the two middle values, as numpy's; torch.median
    would return the lower one and bias the aggregate towards smaller values.
    """
    k = _check_updates(updates, "median")
    s = updates.sort(dim=0).values
    if k % 2:
        return s[k // 2].clone()
    return (s[k // 2 - 1] + s[k // 2]) / 2


def trimmed_mean(updates: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018). Unweighted: sizes are ignored.

    Per coordinate, drops the floor(beta * k) largest and the floor(beta * k) smallest
    values and averages the rest; beta in [0, 0.5) so at least one value remains.
    """
    k = _check_updates(updates, "trimmed_mean")
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got beta = {beta}")
    b = math.floor(beta * k)
    s = updates.sort(dim=0).values
    return s[b : k - b].mean(dim=0)


def _pairwise_sq_dists(updates: torch.Tensor) -> torch.Tensor:
    # The matmul shortcut of cdist (|a|^2 + |b|^2 - 2ab) loses precision exactly when
    # updates are close together, which is the case Krum must rank correctly.
    d = torch.cdist(updates, updates, compute_mode="donot_use_mm_for_euclid_dist")
    return d.square()


def _scores(d2: torch.Tensor, n_closest: int) -> torch.Tensor:
    """From squared distances k x k: each row's sum over its n_closest nearest others."""
    d2 = d2.clone()
    d2.fill_diagonal_(math.inf)
    n_closest = min(n_closest, d2.shape[0] - 1)
    if n_closest <= 0:
        return torch.zeros(d2.shape[0], dtype=d2.dtype, device=d2.device)
    return d2.sort(dim=1).values[:, :n_closest].sum(dim=1)


def _check_krum(k: int, f: int, rule: str) -> None:
    if f < 0:
        raise ValueError(f"{rule} needs f >= 0, got f = {f}")
    if k <= 2 * f + 2:
        raise ValueError(f"{rule} needs k > 2f + 2 updates, got k = {k} with f = {f}")


def krum_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each update (Blanchard et al. 2017): the sum of squared L2 distances
    to its k - f - 2 nearest other updates. Needs k > 2f + 2. Unweighted."""
    k = _check_updates(updates, "krum")
    _check_krum(k, f, "krum")
    return _scores(_pairwise_sq_dists(updates), k - f - 2)


def krum(updates: torch.Tensor, f: int) -> torch.Tensor:
    """The single update with the lowest Krum score (Blanchard et al. 2017), tolerating
    up to f Byzantine updates among k > 2f + 2. Unweighted: sizes are ignored. Ties go
    to the lowest index, so the result is deterministic."""
    scores = krum_scores(updates, f)
    return updates[int(torch.argmin(scores))].clone()


def multi_krum(updates: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Multi-Krum (Blanchard et al. 2017): the plain mean of the m updates with the lowest
    Krum scores, scored once on all k updates. m = 1 is Krum, m = k the plain mean.
    Needs k > 2f + 2 and 1 <= m <= k. Unweighted: sizes are ignored."""
    k = _check_updates(updates, "multi_krum")
    _check_krum(k, f, "multi_krum")
    if not 1 <= m <= k:
        raise ValueError(f"multi_krum needs 1 <= m <= k, got m = {m} with k = {k}")
    scores = _scores(_pairwise_sq_dists(updates), k - f - 2)
    best = torch.argsort(scores, stable=True)[:m]
    return updates[best].mean(dim=0)


def bulyan(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018), tolerating up to f Byzantine updates among
    k >= 4f + 3. Unweighted: sizes are ignored.

    1. Select theta = k - 2f updates by iterated Krum: score the remaining updates,
       move the best one to the selection, repeat.
    2. Per coordinate, average the beta = theta - 2f selected values closest to the
       selection's coordinate-wise median.

    In the last Krum iterations fewer than f + 3 updates remain, so k' - f - 2 would be
    below one neighbour; like Flower, the score then uses one nearest neighbour.
    """
    k = _check_updates(updates, "bulyan")
    if f < 0:
        raise ValueError(f"bulyan needs f >= 0, got f = {f}")
    if k < 4 * f + 3:
        raise ValueError(f"bulyan needs k >= 4f + 3 updates, got k = {k} with f = {f}")
    theta = k - 2 * f
    beta = theta - 2 * f
    d2 = _pairwise_sq_dists(updates)  # once: removing updates does not change distances
    remaining = list(range(k))
    selected: list[int] = []
    while len(selected) < theta:
        idx = torch.tensor(remaining, device=d2.device)
        scores = _scores(d2[idx][:, idx], max(1, len(remaining) - f - 2))
        selected.append(remaining.pop(int(torch.argmin(scores))))
    chosen = updates[selected]
    med = coordinate_median(chosen)
    # Stable sort: among values equally far from the median, keep the earlier-selected.
    order = (chosen - med).abs().argsort(dim=0, stable=True)[:beta]
    return chosen.gather(0, order).mean(dim=0)
