"""Model-poisoning attacks: pure functions on flat update tensors.

Each attack takes the malicious client's honest update (``[d]``, new weights minus the
weights it received) and, where the attack needs them, the round's benign updates
(``[k, d]``: the colluding/omniscient attacker of the literature), its parameters and a
``torch.Generator``, and returns the update the malicious client uploads. The colluding
attacks (ALIE, IPM, min-max, min-sum) return one update that every malicious client
uploads, as in the papers. Nothing here reads or changes state, so both engines and the
tests call the same code. Each ``*Params`` model is what the scenario's ``[[poisoning]]``
entry validates against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from testbed.registry import Params
from testbed.strict import check_noise_std

Direction = Literal["unit_vec", "sign", "std"]


def _check_benign(benign: torch.Tensor, attack: str, at_least: int = 1) -> int:
    if benign.ndim != 2 or benign.shape[0] < at_least:
        raise ValueError(
            f"{attack} needs benign updates k x d with k >= {at_least}, "
            f"got shape {tuple(benign.shape)}"
        )
    return int(benign.shape[0])


# -- naive attacks ---------------------------------------------------------------------


class SignFlipParams(Params):
    scale: float = Field(1.0, gt=0, description="s in update * -s.")


def sign_flip(update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sign flip: upload ``-scale * update``, gradient ascent on the client's own loss.

    The sign-flipping attack of Li et al. 2019, AAAI, "RSA: Byzantine-robust stochastic
    aggregation methods for distributed learning from heterogeneous datasets".
    """
    return update * -scale


class GaussianParams(Params):
    sigma: float = Field(1.0, gt=0, description="Standard deviation of each coordinate.")

    @model_validator(mode="after")
    def _drawable(self) -> GaussianParams:
        check_noise_std(self.sigma, "sigma")
        return self


def gaussian_update(update: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Random update: every coordinate drawn from N(0, sigma^2), ignoring the honest update
    (the "Gaussian" Byzantine worker of Blanchard et al. 2017, NeurIPS, "Machine learning
    with adversaries: Byzantine tolerant gradient descent").

    Drawn on the generator's device, then moved, so the same seed gives the same update
    on CPU and GPU runs.
    """
    noise = torch.randn(update.shape, generator=generator, device=generator.device)
    return (noise * sigma).to(device=update.device, dtype=update.dtype)


# -- model replacement -----------------------------------------------------------------


class ScaledReplacementParams(Params):
    boost: float | None = Field(
        None, gt=0, description="gamma; default n / eta (n: clients per round, eta: server lr)."
    )
    norm_bound: float | None = Field(
        None, gt=0, description="Scale the boosted update down to this L2 norm if above it."
    )


def replacement_boost(n_clients: int, server_lr: float = 1.0) -> float:
    """Bagdasaryan et al.'s boost factor gamma = n / eta: with FedAvg over n equally
    weighted clients and server learning rate eta, the global model moves by eta / n
    times the sum of the updates, so a gamma-scaled update alone moves it by the
    attacker's full update (benign updates roughly cancel near convergence)."""
    if n_clients < 1 or server_lr <= 0:
        raise ValueError(f"boost needs n >= 1 and eta > 0, got n = {n_clients}, eta = {server_lr}")
    return n_clients / server_lr


def scaled_replacement(
    update: torch.Tensor, boost: float, norm_bound: float | None = None
) -> torch.Tensor:
    """Scaled model replacement (Bagdasaryan et al. 2020, AISTATS, "How to backdoor
    federated learning"): upload ``gamma * (X - G)`` where ``X - G`` is the attacker's
    (backdoored) update, so that FedAvg puts the global model at X.

    Norm evasion (their Section 4, "constrain-and-scale"): if ``norm_bound`` is given and
    the boosted update is longer, scale it down to exactly ``norm_bound``, the largest
    update a norm-bounding server still accepts.
    """
    boosted = update * boost
    if norm_bound is not None:
        norm = float(torch.linalg.vector_norm(boosted))
        if norm > norm_bound:
            boosted = boosted * (norm_bound / norm)
    return boosted


# -- colluding attacks -----------------------------------------------------------------


class ALIEParams(Params):
    z: float | None = Field(
        None, description="Standard deviations below the mean; default from n and m (paper)."
    )


def alie_z(n_clients: int, n_malicious: int) -> float:
    """z_max of Baruch et al. 2019: with s = floor(n/2 + 1) - m benign workers that must
    be swayed, z = Phi^{-1}((n - s) / n), Phi the standard normal CDF. Phi^{-1}(p) is
    sqrt(2) * erfinv(2p - 1)."""
    s = math.floor(n_clients / 2 + 1) - n_malicious
    p = (n_clients - s) / n_clients
    if not 0 < p < 1:
        raise ValueError(
            f"ALIE's z needs 0 < (n - s)/n < 1 with s = floor(n/2 + 1) - m, "
            f"got n = {n_clients}, m = {n_malicious}, s = {s}"
        )
    return math.sqrt(2) * float(torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)))


def alie(benign: torch.Tensor, z: float) -> torch.Tensor:
    """A little is enough (Baruch, Baruch & Goldberg 2019, NeurIPS, "A little is
    enough: circumventing defenses for distributed learning"): per coordinate,
    ``mean - z * std`` of the benign updates; ``alie_z`` gives the paper's z.

    The std is the sample std (Bessel's correction, torch's default), as in the
    reference implementations of Baruch et al. and Shejwalkar & Houmansadr; it needs
    k >= 2 benign updates.
    """
    _check_benign(benign, "alie", at_least=2)
    return benign.mean(dim=0) - z * benign.std(dim=0)


class IPMParams(Params):
    epsilon: float = Field(
        0.1, gt=0, description="Scale of -mean; small (0.1) beats Krum, large (>1) the mean."
    )


def inner_product_manipulation(benign: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Inner-product manipulation (Xie, Koyejo & Gupta 2020, UAI, "Fall of empires:
    breaking Byzantine-tolerant SGD by inner product manipulation"): upload
    ``-epsilon * mean(benign)``, so that the aggregate's inner product with the true
    gradient turns negative while the update stays small enough to pass the filters."""
    _check_benign(benign, "inner_product_manipulation")
    return -epsilon * benign.mean(dim=0)


class MinMaxParams(Params):
    direction: Direction = Field(
        "unit_vec", description="Perturbation: -mean/||mean||, -sign(mean) or -std."
    )
    gamma_init: float = Field(10.0, gt=0, description="First gamma of the binary search.")
    tolerance: float = Field(1e-5, gt=0, description="Stop when the step is below this.")


def perturbation(benign: torch.Tensor, direction: Direction) -> torch.Tensor:
    """The perturbation vector p of Shejwalkar & Houmansadr 2021: the inverse unit vector
    of the benign mean, the inverse sign of the mean, or the inverse coordinate-wise std.
    """
    mean = benign.mean(dim=0)
    if direction == "unit_vec":
        norm = torch.linalg.vector_norm(mean)
        return -mean / norm if norm > 0 else torch.zeros_like(mean)
    if direction == "sign":
        return -torch.sign(mean)
    if direction == "std":
        return -benign.std(dim=0)
    raise ValueError(f"unknown perturbation direction {direction!r}")


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exact (no matmul shortcut): the oracle compares distances that are nearly equal
    # at the end of the search.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


def _optimise_gamma(
    benign: torch.Tensor,
    p: torch.Tensor,
    oracle: Callable[[torch.Tensor], bool],
    gamma_init: float,
    tolerance: float,
) -> float:
    """Algorithm 1 of Shejwalkar & Houmansadr 2021: the largest gamma (up to the search's
    resolution) whose malicious update mean + gamma * p the oracle accepts. Start at
    gamma_init with step gamma_init / 2; halve the step each time, moving up on success
    and down on failure, until |gamma_succ - gamma| <= tolerance. Returns 0 if no gamma
    tried is accepted."""
    mean = benign.mean(dim=0)
    gamma, step, gamma_succ = gamma_init, gamma_init / 2, 0.0
    while abs(gamma_succ - gamma) > tolerance:
        if oracle(mean + gamma * p):
            gamma_succ = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return gamma_succ


def min_max(
    benign: torch.Tensor,
    direction: Direction = "unit_vec",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """Min-max (Shejwalkar & Houmansadr 2021, NDSS, "Manipulating the Byzantine:
    optimizing model poisoning attacks and defenses for federated learning"):
    ``mean + gamma * p`` with the largest gamma such that the malicious update's largest
    squared distance to any benign update is at most the largest squared distance
    between two benign updates, so that it hides inside the benign cloud."""
    _check_benign(benign, "min_max")
    p = perturbation(benign, direction)
    bound = _sq_dists(benign, benign).max()

    def oracle(mal: torch.Tensor) -> bool:
        return bool(_sq_dists(mal[None], benign).max() <= bound)

    gamma = _optimise_gamma(benign, p, oracle, gamma_init, tolerance)
    return benign.mean(dim=0) + gamma * p


def min_sum(
    benign: torch.Tensor,
    direction: Direction = "unit_vec",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """Min-sum (Shejwalkar & Houmansadr 2021, NDSS): ``mean + gamma * p`` with the largest
    gamma such that the sum of the malicious update's squared distances to the benign
    updates is at most the largest such sum of any benign update to the others."""
    _check_benign(benign, "min_sum")
    p = perturbation(benign, direction)
    bound = _sq_dists(benign, benign).sum(dim=1).max()

    def oracle(mal: torch.Tensor) -> bool:
        return bool(_sq_dists(mal[None], benign).sum() <= bound)

    gamma = _optimise_gamma(benign, p, oracle, gamma_init, tolerance)
    return benign.mean(dim=0) + gamma * p
