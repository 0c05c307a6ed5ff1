"""Defences against training-time attacks: pure functions on a k x d tensor of updates.

Unlike the rules in ``testbed/robust.py`` these also say what they did to each client, so
that the report can show the detection matrix (malicious uploads dropped vs benign ones
dropped). Each returns a ``Screening``: the aggregate, a per-client weight (its meaning
is given per rule) and a per-client ``kept`` mask. Rules that need state across rounds
(centred clipping's previous aggregate, FoolsGold's history) or randomness (FLAME's
noise) take it as an input and, where it changes, return the new state, so the functions
stay pure and both engines can drive them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testbed.robust import coordinate_median


@dataclass(frozen=True)
class Screening:
    delta: torch.Tensor
    """[d]: the aggregated update."""
    weights: torch.Tensor
    """[k]: each client's weight; its meaning is documented by each rule."""
    kept: torch.Tensor
    """[k] bool: False where the rule dropped the update or gave it weight zero."""


def _check(updates: torch.Tensor, rule: str) -> int:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"{rule} needs updates k x d with k >= 1, got {tuple(updates.shape)}")
    return int(updates.shape[0])


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def _clip_factors(norms: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """min(1, bound / norm), with 1 for a zero norm (nothing to clip)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, (bound / safe).clamp(max=1.0), torch.ones_like(norms))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    n = _norms(x)[:, None]
    return torch.where(n > 0, x / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(x))


# -- centred clipping ------------------------------------------------------------------


def centred_clipping(
    updates: torch.Tensor, previous: torch.Tensor, tau: float, iterations: int = 1
) -> Screening:
    """Centred clipping (Karimireddy, He & Jaggi 2021, ICML, "Learning from history for
    Byzantine robust optimization"): starting from v_0 = ``previous`` (the last round's
    aggregate; the paper's momentum), repeat L = ``iterations`` times
    ``v <- v + mean_i clip(x_i - v, tau)`` with clip(z, tau) = z * min(1, tau / ||z||).
    The paper finds L = 1 enough. The new state for the next round is ``delta``.

    ``weights``: each update's clipping factor min(1, tau / ||x_i - v||) in the last
    iteration (1 = not clipped). Nothing is dropped: ``kept`` is all True.
    """
    k = _check(updates, "centred_clipping")
    if tau <= 0 or iterations < 1:
        raise ValueError(f"centred_clipping needs tau > 0 and L >= 1, got {tau}, {iterations}")
    v = previous.to(device=updates.device, dtype=updates.dtype).clone()
    factors = torch.ones(k, dtype=updates.dtype, device=updates.device)
    for _ in range(iterations):
        diff = updates - v
        factors = _clip_factors(_norms(diff), tau)
        v = v + (diff * factors[:, None]).mean(dim=0)
    return Screening(v, factors, torch.ones(k, dtype=torch.bool, device=updates.device))


# -- geometric median ------------------------------------------------------------------


def geometric_median(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> Screening:
    """Geometric median by the smoothed Weiszfeld algorithm: RFA (Pillutla, Kakade &
    Harchaoui 2022, IEEE TSP, "Robust aggregation for federated learning"). Minimises
    sum_i alpha_i max(nu, ||v - x_i||) from v = the alpha-weighted mean by
    ``beta_i = alpha_i / max(nu, ||v - x_i||)``, ``v <- sum beta_i x_i / sum beta_i``,
    stopping after ``max_iter`` steps or when the objective improves by less than
    ``tol`` times its value (their stopping rule). ``weights`` alpha default to uniform.

    ``weights`` in the result: the normalised beta of the last step, each update's share
    of the median. Nothing is dropped: ``kept`` is all True.
    """
    k = _check(updates, "geometric_median")
    if nu <= 0 or max_iter < 1 or tol < 0:
        raise ValueError("geometric_median needs nu > 0, max_iter >= 1, tol >= 0")
    alpha = torch.ones(k, dtype=updates.dtype, device=updates.device)
    if weights is not None:
        alpha = weights.to(device=updates.device, dtype=updates.dtype)
    if alpha.shape != (k,) or bool((alpha < 0).any()) or float(alpha.sum()) <= 0:
        raise ValueError("geometric_median needs k non-negative weights with a positive sum")
    alpha = alpha / alpha.sum()

    def objective(v: torch.Tensor) -> float:
        return float((alpha * _norms(updates - v).clamp(min=nu)).sum())

    v = alpha @ updates
    beta = alpha
    obj = objective(v)
    for _ in range(max_iter):
        beta = alpha / _norms(updates - v).clamp(min=nu)
        beta = beta / beta.sum()
        v = beta @ updates
        new_obj = objective(v)
        done = abs(obj - new_obj) <= tol * new_obj
        obj = new_obj
        if done:
            break
    return Screening(v, beta, torch.ones(k, dtype=torch.bool, device=updates.device))


# -- FLTrust ---------------------------------------------------------------------------


def fltrust(updates: torch.Tensor, server_update: torch.Tensor) -> Screening:
    """FLTrust (Cao, Fang, Liu & Gong 2021, NDSS, "FLTrust: Byzantine-robust federated
    learning via trust bootstrapping"). ``server_update`` g_0 is the server's own update
    on its small clean root set. Trust score TS_i = ReLU(cos(g_i, g_0)); each update is
    rescaled to ||g_0|| (so no client gains weight by magnitude), and the aggregate is
    sum_i TS_i * g_i * ||g_0|| / ||g_i|| / sum_i TS_i. All scores zero: a zero update.

    ``weights``: TS_i / sum TS (each client's share); ``kept``: TS_i > 0.
    """
    _check(updates, "fltrust")
    g0_norm = _norms(server_update)
    cos = _unit_rows(updates) @ _unit_rows(server_update[None])[0]
    ts = cos.clamp(min=0)
    kept = ts > 0
    total = ts.sum()
    if float(total) <= 0:
        return Screening(torch.zeros_like(server_update), torch.zeros_like(ts), kept)
    rescaled = _unit_rows(updates) * g0_norm
    share = ts / total
    return Screening(share @ rescaled, share, kept)


# -- FLAME -----------------------------------------------------------------------------


def _majority_cluster(updates: torch.Tensor, min_cluster_size: int) -> torch.Tensor:
    """Mask of the updates in HDBSCAN's largest cluster on pairwise cosine distances."""
    from sklearn.cluster import HDBSCAN  # lazy: only FLAME needs scikit-learn

    unit = _unit_rows(updates.detach().double().cpu())
    dist = (1 - unit @ unit.T).clamp(0, 2)
    dist = ((dist + dist.T) / 2).fill_diagonal_(0).numpy()  # exactly symmetric, zero diagonal
    # min_samples=1 and allow_single_cluster=True as in the authors' implementation: a
    # benign majority may form one cluster, which must not be reported as noise.
    labels = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(dist)
    labels_t = torch.as_tensor(labels)
    clusters = labels_t[labels_t >= 0]
    if clusters.numel() == 0:
        return torch.zeros(len(labels), dtype=torch.bool)
    majority = int(torch.bincount(clusters).argmax())  # ties: the lowest label
    return labels_t == majority


def flame(
    updates: torch.Tensor,
    noise_lambda: float,
    generator: torch.Generator,
    min_cluster_size: int | None = None,
) -> Screening:
    """FLAME (Nguyen et al. 2022, USENIX Security, "FLAME: taming backdoors in federated
    learning"):

    1. HDBSCAN (scikit-learn) on the pairwise cosine distances of the updates with
       min_cluster_size = floor(k/2) + 1; only the majority cluster is admitted, the
       rest (outliers) dropped.
    2. S = the median L2 norm of all k updates (their distance to the global model);
       each admitted update is clipped to S: x_i * min(1, S / ||x_i||).
    3. The mean of the clipped admitted updates plus Gaussian noise N(0, (lambda S)^2)
       per coordinate, drawn from ``generator``. The paper sets lambda = 0.001 for
       image classification (0.01 for its NLP and IoT tasks).

    The paper clusters the local models; the cosine distances between updates (models
    minus the common global model) are what its implementation uses and what this does.
    If no cluster is found (no majority agrees), nothing is admitted and the aggregate
    is the noise alone. ``weights``: each update's coefficient in the mean,
    min(1, S / ||x_i||) / (number admitted), 0 for dropped ones.
    """
    k = _check(updates, "flame")
    if noise_lambda < 0:
        raise ValueError(f"flame needs lambda >= 0, got {noise_lambda}")
    mcs = k // 2 + 1 if min_cluster_size is None else min_cluster_size
    # HDBSCAN cannot cluster fewer than two points: with one update, admit it.
    kept = _majority_cluster(updates, max(mcs, 2)) if k >= 2 else torch.ones(1, dtype=torch.bool)
    kept = kept.to(updates.device)
    norms = _norms(updates)
    s = coordinate_median(norms[:, None])[0]
    coef = _clip_factors(norms, s) * kept
    n_kept = int(kept.sum())
    if n_kept:
        coef = coef / n_kept
    delta = coef @ updates
    noise = torch.randn(
        delta.shape, generator=generator, device=generator.device, dtype=delta.dtype
    )
    delta = delta + noise.to(delta.device) * (noise_lambda * s)
    return Screening(delta, coef, kept)


# -- FoolsGold -------------------------------------------------------------------------


def foolsgold_weights(history: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client learning-rate weights alpha from the clients' summed update
    histories (Fung, Yoon & Beschastnikh 2020, RAID, "The limitations of federated
    learning in sybil settings", Algorithm 1, as in the authors' code):

    cs_ij = cos(H_i, H_j), cs_ii = 0; v_i = max_j cs_ij. Pardoning: if v_i < v_j,
    cs_ij *= v_i / v_j. alpha_i = 1 - max_j cs_ij, clipped to [0, 1], divided by its
    maximum, 1 replaced by 0.99, then alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)
    clipped to [0, 1]. Sybils that push the same direction end up with weight 0.
    """
    k = _check(history, "foolsgold")
    if kappa <= 0:
        raise ValueError(f"foolsgold needs kappa > 0, got {kappa}")
    unit = _unit_rows(history.double())
    cs = (unit @ unit.T).fill_diagonal_(0)
    v = cs.max(dim=1).values
    pardon = v[:, None] < v[None, :]  # never on the diagonal
    ratio = v[:, None] / torch.where(pardon, v[None, :], torch.ones_like(cs))
    cs = torch.where(pardon, cs * ratio, cs)
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
    top = alpha.max()
    if k == 1:  # no one to be similar to
        return torch.ones(1, dtype=history.dtype, device=history.device)
    if float(top) <= 0:  # every client has a perfect twin: all look like sybils
        return torch.zeros(k, dtype=history.dtype, device=history.device)
    alpha = (alpha / top).clamp(max=0.99)
    logit = kappa * (torch.log(alpha / (1 - alpha)) + 0.5)  # log(0) = -inf, clipped to 0
    return logit.clamp(0, 1).to(device=history.device, dtype=history.dtype)


def foolsgold(
    updates: torch.Tensor, history: torch.Tensor, kappa: float = 1.0
) -> tuple[Screening, torch.Tensor]:
    """FoolsGold (Fung, Yoon & Beschastnikh 2020, RAID): add this round's updates to each
    client's history (rows of ``history`` match the rows of ``updates``; zeros for a
    client's first round), weight each client by ``foolsgold_weights`` of the new
    history, and aggregate. The paper adds sum_i alpha_i x_i to the model (an SGD step);
    this returns the alpha-weighted mean, so that the step size stays FedAvg's and the
    comparison with the other rules is fair. All weights zero: a zero update.

    Returns the screening (``weights``: alpha; ``kept``: alpha > 0) and the new history.
    The paper's optional importance weighting of output-layer features is not applied.
    """
    _check(updates, "foolsgold")
    if history.shape != updates.shape:
        raise ValueError(f"foolsgold history {tuple(history.shape)} != {tuple(updates.shape)}")
    new_history = history + updates
    alpha = foolsgold_weights(new_history, kappa).to(updates.device)
    total = alpha.sum()
    share = alpha / total if float(total) > 0 else alpha
    return Screening(share @ updates, alpha, alpha > 0), new_history
