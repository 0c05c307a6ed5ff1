"""Adversarial training inside each client's local training, with ART's AdversarialTrainer.

Each local round trains on batches where a `ratio` share of the images is replaced by PGD
examples crafted on the client's current model (Madry et al. 2018; ART does the mixing).
ART shuffles with numpy's global RNG, seeded here per seed, round and client. The
engine's augmentation does not apply to these clients (ART feeds its own batches).
"""

from __future__ import annotations

import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.defences.trainer import AdversarialTrainer
from art.estimators.classification import PyTorchClassifier
from pydantic import Field, model_validator
from torch import nn

from testbed import hookimpl
from testbed.local_training import ClientData, LocalConfig
from testbed.registry import KindRegistry, Params
from testbed.state import RoundContext, derive_seed
from testbed.transfer import numpy_seeded


class AdversarialTrainingParams(Params):
    eps: float = Field(0.03, gt=0, le=1, description="PGD budget of the training examples.")
    eps_step: float = Field(0.01, gt=0, le=1, description="PGD step size.")
    max_iter: int = Field(5, ge=1, description="PGD steps per training example.")
    ratio: float = Field(0.5, gt=0, le=1, description="Share of each batch made adversarial.")

    @model_validator(mode="after")
    def _step_within_eps(self) -> AdversarialTrainingParams:
        if self.eps_step > self.eps:
            raise ValueError(f"eps_step ({self.eps_step}) larger than eps ({self.eps})")
        return self


class AdversarialTraining:
    stateless = True  # only its params: safe to copy into every Flower ClientApp

    def __init__(self, p: AdversarialTrainingParams) -> None:
        self.p = p

    @hookimpl
    def testbed_local_training(
        self,
        ctx: RoundContext,
        model: nn.Module,
        data: ClientData,
        cfg: LocalConfig,
        generator: torch.Generator,
    ) -> float:
        device = data.x_train.device
        x = data.x_train.float().div(255)
        with torch.no_grad():
            nb_classes = int(model(x[:1]).shape[1])
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        clf = PyTorchClassifier(
            model,
            loss=nn.CrossEntropyLoss(),
            optimizer=opt,
            input_shape=tuple(x.shape[1:]),
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            preprocessing=None,
            device_type="gpu" if device.type == "cuda" else "cpu",
        )
        pgd = ProjectedGradientDescent(
            clf,
            eps=self.p.eps,
            eps_step=self.p.eps_step,
            max_iter=self.p.max_iter,
            num_random_init=1,
            batch_size=cfg.batch_size,
            verbose=False,
        )
        trainer = AdversarialTrainer(clf, attacks=pgd, ratio=self.p.ratio)
        x_np, y_np = x.cpu().numpy(), data.y_train.cpu().numpy()
        with numpy_seeded(derive_seed(ctx.seed, ctx.round, "adversarial_training", data.client_id)):
            trainer.fit(x_np, y_np, nb_epochs=cfg.epochs, batch_size=cfg.batch_size)
        model.train()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(x), data.y_train)
        return float(loss)


@hookimpl
def testbed_register_defences(registry: KindRegistry) -> None:
    registry.add(
        "adversarial_training",
        AdversarialTraining,
        params=AdversarialTrainingParams,
        description="PGD adversarial training in each client's local rounds (ART)",
    )
