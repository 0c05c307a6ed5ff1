"""Training-time attacks of the compromised clients: thin plugins over the pure functions
of ``testbed.poisoning`` (model poisoning) and ``testbed.data_poisoning`` (data
poisoning). Each object implements part of the contract of
``testbed_register_poisoning``: ``poison_data`` (once per compromised client, on its
training data) and/or ``poison_update`` (each round, on its upload), and what the report
measures (``backdoor_test``, ``label_map``). The papers are cited on the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import Generator, Tensor

from testbed import hookimpl
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.data_poisoning import (
    BackdoorParams,
    CleanLabelBackdoorParams,
    LabelFlipParams,
    apply_trigger,
    backdoor,
    clean_label_backdoor,
    flip_all_labels,
    flip_source_to_target,
)
from testbed.local_training import ClientData, LocalConfig, local_sgd, seeded
from testbed.poisoning import (
    ALIEParams,
    GaussianParams,
    IPMParams,
    MinMaxParams,
    ScaledReplacementParams,
    SignFlipParams,
    alie,
    alie_z,
    gaussian_update,
    inner_product_manipulation,
    min_max,
    min_sum,
    replacement_boost,
    scaled_replacement,
    sign_flip,
)
from testbed.registry import KindRegistry
from testbed.scenario import Augment
from testbed.state import RoundContext
from testbed.transfer import numpy_seeded

if TYPE_CHECKING:
    from testbed.scenario import Scenario


def _check_class(what: str, c: int, num_classes: int) -> None:
    if not 0 <= c < num_classes:
        raise ValueError(
            f"{what} class {c} does not exist; the task has {num_classes} classes "
            f"(0..{num_classes - 1})"
        )


# -- data poisoning --------------------------------------------------------------------


class LabelFlip:
    """Label flipping: every class (Fang et al. 2020) or source -> target (Tolpegin et al.
    2020); see ``testbed.data_poisoning``."""

    def __init__(self, p: LabelFlipParams) -> None:
        self.p = p

    def label_map(self, num_classes: int) -> list[int]:
        """The label each class is taught as; the targeted error is measured on it."""
        if self.p.mode == "source_target":
            assert self.p.source is not None and self.p.target is not None
            _check_class("source", self.p.source, num_classes)
            _check_class("target", self.p.target, num_classes)
            out = list(range(num_classes))
            out[self.p.source] = self.p.target
            return out
        perm = self.p.permutation or list(range(num_classes - 1, -1, -1))
        if sorted(perm) != list(range(num_classes)):
            raise ValueError(
                f"permutation {perm} is not a permutation of the task's {num_classes} classes"
            )
        return list(perm)

    def poison_data(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mapping = self.label_map(num_classes)  # checks the classes first
        if self.p.source is not None and self.p.target is not None:
            return x, flip_source_to_target(y, self.p.source, self.p.target)
        return x, flip_all_labels(y, num_classes, mapping)


class Backdoor:
    """Backdoor with a trigger through ART's PoisoningAttackBackdoor (Gu et al. 2017,
    BadNets; in FL Bagdasaryan et al. 2020); see ``testbed.data_poisoning.backdoor``."""

    def __init__(self, p: BackdoorParams) -> None:
        self.p = p

    def poison_data(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_class("target", self.p.target, num_classes)
        x, y, _ = backdoor(
            x, y, self.p.target, self.p.rate, generator, self.p.trigger, self.p.distance
        )
        return x, y

    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Test images with the trigger, and the class the backdoor should make of them."""
        return apply_trigger(x, self.p.trigger, self.p.distance), self.p.target


class CleanLabelBackdoor:
    """Clean-label backdoor (Turner et al. 2019) through ART; see
    ``testbed.data_poisoning.clean_label_backdoor``. The attacker has no federated model
    before training, so it first trains a proxy of its own on its own data: a small paper
    CNN, plain SGD (the engine's ``local_sgd``), seeded from the run."""

    PROXY = PaperCNNParams(
        conv_channels=(8, 8, 16, 16, 32, 32), fc_units=(64, 32, 32, 16), dropout=0.0
    )

    def __init__(self, p: CleanLabelBackdoorParams) -> None:
        self.p = p

    def proxy(self, x: Tensor, y: Tensor, num_classes: int, seed: int) -> torch.nn.Module:
        floats = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        mean = floats.mean(dim=(0, 2, 3)).tolist()
        std = floats.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
        with seeded(seed, x.device):
            model = build_paper_cnn(self.PROXY, x.shape[1], x.shape[-1], num_classes, mean, std)
        cfg = LocalConfig(self.p.proxy_epochs, 32, 0.01, 0.9, 0.0, Augment(hflip=False))
        data = ClientData(-1, x, y, x[:0], y[:0])
        with seeded(seed, x.device):
            local_sgd(model.to(x.device).train(), data, cfg, torch.Generator().manual_seed(seed))
        return model.requires_grad_(False)

    def poison_data(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_class("target", self.p.target, num_classes)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        proxy = self.proxy(x, y, num_classes, seed)
        with numpy_seeded(seed):  # ART draws the poisoned images from numpy's generator
            return clean_label_backdoor(x, y, proxy, self.p, num_classes)

    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        return apply_trigger(x, self.p.trigger, self.p.distance), self.p.target


# -- model poisoning -------------------------------------------------------------------


class ScaledReplacementRunParams(ScaledReplacementParams):
    start_round: int = Field(
        1,
        ge=1,
        description="First round of the boosted upload; before it, the honest update. The "
        "paper replaces the model near convergence, when benign updates nearly cancel.",
    )


def check_start_round(params: ScaledReplacementRunParams, scenario: Scenario) -> list[str]:
    rounds = scenario.federation.rounds
    if params.start_round > rounds:
        return [
            f"scaled_replacement start_round {params.start_round} > {rounds} rounds: it never acts"
        ]
    return []


UpdateRule = Callable[[Any, Tensor, Tensor | None, RoundContext, Generator], Tensor]
"""(params, honest update, benign updates or None, ctx, generator) -> the upload."""


class UpdatePoisoning:
    """A model-poisoning plugin: a compromised client's upload is ``rule(params, ...)``."""

    def __init__(self, p: Any, rule: UpdateRule) -> None:
        self.p = p
        self.rule = rule

    def poison_update(
        self,
        update: torch.Tensor,
        benign: torch.Tensor | None,
        ctx: RoundContext,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return self.rule(self.p, update, benign, ctx, generator)


def _colluders(benign: torch.Tensor | None) -> torch.Tensor:
    if benign is None:  # validation refuses these attacks without threat_model.collude
        raise ValueError("this attack needs the round's benign updates (collude = true)")
    return benign


def _sign_flip(
    p: SignFlipParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """Sign flip (Li et al. 2019, RSA)."""
    return sign_flip(update, p.scale)


def _gaussian(
    p: GaussianParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """Random Gaussian update (Blanchard et al. 2017)."""
    return gaussian_update(update, p.sigma, g)


def _scaled_replacement(
    p: ScaledReplacementRunParams,
    update: Tensor,
    benign: Tensor | None,
    ctx: RoundContext,
    g: Generator,
) -> Tensor:
    """Scaled model replacement (Bagdasaryan et al. 2020); boost default n / eta with n the
    clients sampled this round and eta = 1 (the server adds the aggregate as is). Exact
    replacement under FedAvg when the sampled clients hold equal shares of data. From
    ``start_round`` on; before it the client uploads its honest update."""
    if ctx.round < p.start_round:
        return update
    boost = p.boost if p.boost is not None else replacement_boost(len(ctx.sampled))
    return scaled_replacement(update, boost, p.norm_bound)


def _alie(
    p: ALIEParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """A little is enough (Baruch et al. 2019); z from n (sampled) and m (compromised among
    them) by the paper's formula unless given."""
    benign = _colluders(benign)
    n = len(ctx.sampled)
    z = p.z if p.z is not None else alie_z(n, n - int(benign.shape[0]))
    return alie(benign, z)


def _ipm(
    p: IPMParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """Inner-product manipulation (Xie et al. 2020)."""
    return inner_product_manipulation(_colluders(benign), p.epsilon)


def _min_max(
    p: MinMaxParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """Min-max (Shejwalkar & Houmansadr 2021, NDSS)."""
    return min_max(_colluders(benign), p.direction, p.gamma_init, p.tolerance)


def _min_sum(
    p: MinMaxParams, update: Tensor, benign: Tensor | None, ctx: RoundContext, g: Generator
) -> Tensor:
    """Min-sum (Shejwalkar & Houmansadr 2021, NDSS)."""
    return min_sum(_colluders(benign), p.direction, p.gamma_init, p.tolerance)


def needs_collusion(name: str) -> Callable[[Any, Scenario], list[str]]:
    def check(params: Any, scenario: Scenario) -> list[str]:
        if not scenario.threat_model.collude:
            return [
                f"{name} reads the round's benign updates: it needs threat_model.collude = true"
            ]
        return []

    return check


@hookimpl
def testbed_register_poisoning(registry: KindRegistry) -> None:
    registry.add(
        "label_flip",
        LabelFlip,
        params=LabelFlipParams,
        description="Flip all labels or source -> target (Fang et al. 2020; Tolpegin et al. 2020)",
    )
    registry.add(
        "backdoor",
        Backdoor,
        params=BackdoorParams,
        description="Trigger + target label on a share of the data, via ART (Gu et al. 2017)",
    )
    registry.add(
        "clean_label_backdoor",
        CleanLabelBackdoor,
        params=CleanLabelBackdoorParams,
        description="Trigger on PGD-hidden target-class images, labels kept, via ART "
        "(Turner et al. 2019)",
    )
    registry.add(
        "sign_flip",
        lambda p: UpdatePoisoning(p, _sign_flip),
        params=SignFlipParams,
        description="Upload -scale x the honest update (Li et al. 2019)",
    )
    registry.add(
        "gaussian",
        lambda p: UpdatePoisoning(p, _gaussian),
        params=GaussianParams,
        description="Upload N(0, sigma^2) noise (Blanchard et al. 2017)",
    )
    registry.add(
        "scaled_replacement",
        lambda p: UpdatePoisoning(p, _scaled_replacement),
        params=ScaledReplacementRunParams,
        description="Boost the update by n/eta, optional norm bound (Bagdasaryan et al. 2020)",
        check=check_start_round,
    )
    registry.add(
        "alie",
        lambda p: UpdatePoisoning(p, _alie),
        params=ALIEParams,
        description="Benign mean - z x std (Baruch et al. 2019); needs collude",
        check=needs_collusion("alie"),
    )
    registry.add(
        "ipm",
        lambda p: UpdatePoisoning(p, _ipm),
        params=IPMParams,
        description="-epsilon x benign mean (Xie et al. 2020); needs collude",
        check=needs_collusion("ipm"),
    )
    registry.add(
        "min_max",
        lambda p: UpdatePoisoning(p, _min_max),
        params=MinMaxParams,
        description="Largest step inside the benign spread (Shejwalkar & Houmansadr 2021)",
        check=needs_collusion("min_max"),
    )
    registry.add(
        "min_sum",
        lambda p: UpdatePoisoning(p, _min_sum),
        params=MinMaxParams,
        description="Largest step within the benign sum of distances (Shejwalkar 2021)",
        check=needs_collusion("min_sum"),
    )
