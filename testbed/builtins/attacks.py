"""FGSM, BIM and PGD (L-inf), all crafted by ART on a PyTorchClassifier."""

from __future__ import annotations

import numpy as np
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from pydantic import Field

from testbed import hookimpl
from testbed.registry import KindRegistry, Params


class FGSMParams(Params):
    eps: float = Field(gt=0, le=1, description="L-inf budget in [0, 1] pixel units.")
    batch_size: int = Field(100, ge=1, description="Images crafted per ART batch.")


class BIMParams(FGSMParams):
    eps_step: float = Field(gt=0, le=1, description="alpha: step size per iteration.")
    max_iter: int = Field(ge=1, description="k: number of iterations.")


class PGDParams(BIMParams):
    num_random_init: int = Field(
        1, ge=0, description="Random starts in the eps-ball (0: start at x, i.e. BIM)."
    )


def build_fgsm(p: FGSMParams, estimator: PyTorchClassifier) -> FastGradientMethod:
    return FastGradientMethod(estimator, norm=np.inf, eps=p.eps, batch_size=p.batch_size)


def build_bim(p: BIMParams, estimator: PyTorchClassifier) -> BasicIterativeMethod:
    return BasicIterativeMethod(
        estimator,
        eps=p.eps,
        eps_step=p.eps_step,
        max_iter=p.max_iter,
        batch_size=p.batch_size,
        verbose=False,
    )


def build_pgd(p: PGDParams, estimator: PyTorchClassifier) -> ProjectedGradientDescent:
    return ProjectedGradientDescent(
        estimator,
        norm=np.inf,
        eps=p.eps,
        eps_step=p.eps_step,
        max_iter=p.max_iter,
        num_random_init=p.num_random_init,
        batch_size=p.batch_size,
        verbose=False,
    )


@hookimpl
def testbed_register_attacks(registry: KindRegistry) -> None:
    registry.add("fgsm", build_fgsm, params=FGSMParams, description="Fast gradient sign, 1 step")
    registry.add(
        "bim", build_bim, params=BIMParams, description="Basic iterative method, no random start"
    )
    registry.add(
        "pgd", build_pgd, params=PGDParams, description="Projected gradient descent, random start"
    )
