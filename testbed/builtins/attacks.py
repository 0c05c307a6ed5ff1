"""FGSM, BIM and PGD (L-inf), all crafted by ART on a PyTorchClassifier.

On a PyTorchClassifier (the estimator the engine builds) the builders return `LeanPGDPyTorch`
or `LeanFGSMPyTorch`: small subclasses of ART's `ProjectedGradientDescentPyTorch` that keep
ART's per-step maths (`_generate_batch`, `_compute_pytorch`, `_compute_perturbation_pytorch`,
`_apply_perturbation_pytorch`) and drop work that does not change the adversarial examples.
Any other estimator gets the stock ART attack. `reference_linf_attack` is the bare-PyTorch loop
the benchmarks (docs/BENCHMARKS.md) and tests measure these against.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod, ProjectedGradientDescent
from art.attacks.evasion.projected_gradient_descent import projected_gradient_descent_pytorch
from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
    ProjectedGradientDescentPyTorch,
)
from art.config import ART_NUMPY_DTYPE
from art.estimators.classification import PyTorchClassifier
from art.utils import compute_success, compute_success_array
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from testbed import hookimpl
from testbed.registry import KindRegistry, Params

# ART's own logger for this attack: whoever turns ART's INFO logging on still gets its
# "Success rate of attack" line from the lean path.
_art_pgd_logger = logging.getLogger(projected_gradient_descent_pytorch.__name__)


class FGSMParams(Params):
    eps: float = Field(gt=0, le=1, description="L-inf budget in [0, 1] pixel units.")
    batch_size: int = Field(100, ge=1, description="Images crafted per ART batch.")

    @model_validator(mode="before")
    @classmethod
    def _linf_only(cls, data: Any) -> Any:
        # the lean path projects onto the L-inf ball: an L2 request must not run as L-inf
        if isinstance(data, dict) and "norm" in data:
            raise ValueError(
                "fgsm, bim and pgd are L-inf attacks here (no norm param); for an L2 budget "
                'use square or autoattack with norm = "2", or cw_l2'
            )
        return data


class BIMParams(FGSMParams):
    eps_step: float = Field(gt=0, le=1, description="alpha: step size per iteration.")
    max_iter: int = Field(ge=1, description="k: number of iterations.")

    @model_validator(mode="after")
    def _step_within_eps(self) -> BIMParams:
        if self.eps_step > self.eps:
            raise ValueError(
                f"eps_step ({self.eps_step}) larger than eps ({self.eps}): the first step "
                "already reaches the eps-ball boundary"
            )
        return self


class PGDParams(BIMParams):
    num_random_init: int = Field(
        1, ge=0, description="Random starts in the eps-ball (0: start at x, i.e. BIM)."
    )


class LeanPGDPyTorch(ProjectedGradientDescentPyTorch):
    """ART's PyTorch PGD without the work that does not change its output.

    Profiled against a bare loop (docs/BENCHMARKS.md), stock ART spends the extra time on
    (1) a success-rate check in `generate` (two forward passes over all images) that runs even
    when INFO logging is off, and (2) a float64, batch-sized copy of a scalar eps in every
    step's projection. Both go here; everything else is ART's code, inherited unchanged."""

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        """Stock `ProjectedGradientDescentPyTorch.generate`, with two changes (marked below);
        same checks, targets, batching, restarts and results."""
        if self.summary_writer is not None:
            # TensorBoard bookkeeping (per-batch reset etc.) lives in the stock loop: keep it.
            return super().generate(x, y, **kwargs)

        mask = self._get_mask(x, **kwargs)
        self._check_compatibility_input_and_eps(x=x)
        self._random_eps()
        targets = self._set_targets(x, y)

        # Change 1: whole-array tensors sliced per batch instead of ART's TensorDataset +
        # DataLoader, whose default collate re-stacks every batch sample by sample. Same
        # values in the same order; the copies from `astype` keep `x` itself untouched.
        x_t = torch.from_numpy(x.astype(ART_NUMPY_DTYPE))
        y_t = torch.from_numpy(targets.astype(ART_NUMPY_DTYPE))
        mask_t = None if mask is None else torch.from_numpy(mask.astype(ART_NUMPY_DTYPE))
        adv_x = x.astype(ART_NUMPY_DTYPE)

        for batch_id, start in enumerate(range(0, x.shape[0], self.batch_size)):
            self._batch_id = batch_id
            end = start + self.batch_size
            batch, batch_labels = x_t[start:end], y_t[start:end]
            mask_batch = None
            if mask_t is not None:
                # As stock ART: a per-sample mask is sliced, a shared one repeated per sample.
                if mask_t.dim() == x_t.dim():
                    mask_batch = mask_t[start:end]
                else:
                    mask_batch = mask_t.expand(batch.shape[0], *mask_t.shape)
            batch_eps, batch_eps_step = self._batch_eps_and_step(x, start, end)

            for rand_init_num in range(max(1, self.num_random_init)):
                adversarial_batch = self._generate_batch(
                    x=batch,
                    targets=batch_labels,
                    mask=mask_batch,
                    eps=batch_eps,
                    eps_step=batch_eps_step,
                )
                if rand_init_num == 0:
                    adv_x[start:end] = adversarial_batch
                else:
                    # Further restarts replace an example only where they succeed (stock ART,
                    # which hands the torch batch to `predict`; numpy views are the same values
                    # without numpy's deprecated implicit conversion of a tensor).
                    attack_success = compute_success_array(
                        self.estimator,
                        batch.numpy(),
                        batch_labels.numpy(),
                        adversarial_batch,
                        self.targeted,
                        batch_size=self.batch_size,
                    )
                    adv_x[start:end][attack_success] = adversarial_batch[attack_success]

        # Change 2: stock ART passes `compute_success(...)` as an argument of `logger.info`, so
        # Python evaluates it (a forward pass over x and one over adv_x) even when INFO is off.
        # It only feeds the log line: compute it only when that line is emitted.
        if _art_pgd_logger.isEnabledFor(logging.INFO):
            _art_pgd_logger.info(
                "Success rate of attack: %.2f%%",
                100
                * compute_success(
                    self.estimator, x, targets, adv_x, self.targeted, batch_size=self.batch_size
                ),
            )
        return adv_x

    def _batch_eps_and_step(self, x: np.ndarray, start: int, end: int):
        """Per-sample eps arrays are sliced per batch; anything else applies as is (stock ART)."""
        if (
            isinstance(self.eps, np.ndarray)
            and isinstance(self.eps_step, np.ndarray)
            and len(self.eps.shape) == len(x.shape)
            and self.eps.shape[0] == x.shape[0]
        ):
            return self.eps[start:end], self.eps_step[start:end]
        return self.eps, self.eps_step

    def _apply_perturbation_pytorch(
        self, x: torch.Tensor, perturbation: torch.Tensor, eps_step: int | float | np.ndarray
    ) -> torch.Tensor:
        """L-inf step with a scalar eps_step as one fused add and one in-place clamp; anything
        else goes to ART's `_apply_perturbation_pytorch`.

        Stock ART builds `eps_step * perturbation`, zeroes its NaNs with a mask, adds it, then
        clips with a `min` and a `max`: six passes over the batch per step. For the L-inf norm
        `perturbation` is `sign(grad)` of a gradient whose NaNs `_compute_perturbation_pytorch`
        has already zeroed, so it holds only -1, 0 and 1 and a finite eps_step (> 0, checked by
        ART) cannot make NaNs; `x + eps_step * perturbation` is then exact in one pass, and
        `clamp` equals `max(min(x, hi), lo)` value for value."""
        if self.norm not in ("inf", np.inf) or np.ndim(eps_step) != 0:
            return super()._apply_perturbation_pytorch(x, perturbation, eps_step)
        x = torch.add(x, perturbation, alpha=float(np.float32(eps_step)))
        if self.estimator.clip_values is not None:
            clip_min, clip_max = self.estimator.clip_values
            if np.ndim(clip_min) == 0 and np.ndim(clip_max) == 0:
                return x.clamp_(float(clip_min), float(clip_max))
            device = self.estimator.device
            x = torch.max(
                torch.min(x, torch.tensor(clip_max).to(device)), torch.tensor(clip_min).to(device)
            )
        return x

    @staticmethod
    def _projection(
        values: torch.Tensor,
        eps: int | float | np.ndarray,
        norm_p: int | float | str,
        *,
        suboptimal: bool = True,
    ) -> torch.Tensor:
        """L-inf projection with a scalar eps as a clamp to [-eps, eps]; everything else goes
        to ART's `_projection`.

        Stock ART runs every step `np.broadcast_to(eps, values.shape)`, checks it elementwise,
        copies it into a float64 tensor of the batch's shape and computes
        `sign(v) * minimum(|v|, eps)` in float64 before casting back. For a scalar eps that
        is `clamp(v, -eps, eps)` in float32, value for value: a float32 v is below eps exactly
        when it is at most float32(eps), and the float64 eps casts back to float32(eps)
        (tests/test_attacks.py compares both bit for bit)."""
        if norm_p in ("inf", np.inf) and np.ndim(eps) == 0:
            eps = float(eps)
            assert eps >= 0
            return values.clamp(-eps, eps)
        return ProjectedGradientDescentPyTorch._projection(
            values, eps, norm_p, suboptimal=suboptimal
        )


class LeanFGSMPyTorch(LeanPGDPyTorch):
    """FGSM as ART's one-step L-inf PGD: step eps, no random start, clip to clip_values.

    This is the update of ART's `FastGradientMethod` (x + eps * sign(grad), clipped, projected
    onto the eps-ball), but run by the PyTorch implementation: the stock FastGradientMethod
    takes the numpy path on every estimator, copying the input to a tensor and the gradient
    back to numpy and then doing the sign, NaN checks, clipping and projection in numpy."""

    def __init__(self, estimator: PyTorchClassifier, eps: float, batch_size: int = 32) -> None:
        super().__init__(
            estimator,
            norm=np.inf,
            eps=eps,
            eps_step=eps,
            max_iter=1,
            num_random_init=0,
            batch_size=batch_size,
            verbose=False,
        )


def _lean_capable(estimator) -> bool:
    """The lean subclasses need what ART's PyTorch PGD needs: a PyTorchClassifier whose
    preprocessing all runs in PyTorch."""
    return isinstance(estimator, PyTorchClassifier) and estimator.all_framework_preprocessing


def build_fgsm(p: FGSMParams, estimator: PyTorchClassifier) -> FastGradientMethod | LeanFGSMPyTorch:
    if _lean_capable(estimator):
        return LeanFGSMPyTorch(estimator, eps=p.eps, batch_size=p.batch_size)
    return FastGradientMethod(estimator, norm=np.inf, eps=p.eps, batch_size=p.batch_size)


def build_bim(p: BIMParams, estimator: PyTorchClassifier) -> BasicIterativeMethod | LeanPGDPyTorch:
    if _lean_capable(estimator):
        # ART's BasicIterativeMethod is its PGD with num_random_init=0 (iterative_method.py).
        return LeanPGDPyTorch(
            estimator,
            norm=np.inf,
            eps=p.eps,
            eps_step=p.eps_step,
            max_iter=p.max_iter,
            num_random_init=0,
            batch_size=p.batch_size,
            verbose=False,
        )
    return BasicIterativeMethod(
        estimator,
        eps=p.eps,
        eps_step=p.eps_step,
        max_iter=p.max_iter,
        batch_size=p.batch_size,
        verbose=False,
    )


def build_pgd(
    p: PGDParams, estimator: PyTorchClassifier
) -> ProjectedGradientDescent | LeanPGDPyTorch:
    cls = LeanPGDPyTorch if _lean_capable(estimator) else ProjectedGradientDescent
    return cls(
        estimator,
        norm=np.inf,
        eps=p.eps,
        eps_step=p.eps_step,
        max_iter=p.max_iter,
        num_random_init=p.num_random_init,
        batch_size=p.batch_size,
        verbose=False,
    )


def reference_linf_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    eps_step: float,
    max_iter: int,
    random_init: bool,
) -> torch.Tensor:
    """Bare-PyTorch L-inf FGSM / BIM / PGD: the yardstick for the ART-backed attacks.

    Gradients w.r.t. the input only (`torch.autograd.grad`), sign step, then one clamp to the
    eps-ball intersected with [0, 1]. The random start draws from numpy's global RNG exactly
    as ART does (uniform in [-eps, eps], clipped to [0, 1]), so both start from the same
    point under the same seed. FGSM: `eps_step=eps, max_iter=1, random_init=False`.
    `y` holds class indices; put the model in eval mode (and freeze it) first."""
    x0 = x.detach()
    lower, upper = (x0 - eps).clamp(min=0.0), (x0 + eps).clamp(max=1.0)
    if random_init:
        noise = np.random.uniform(-eps, eps, (x0.shape[0], x0[0].numel()))
        x_adv = x0 + torch.from_numpy(noise.reshape(x0.shape).astype(np.float32)).to(x0.device)
        x_adv = x_adv.clamp(0.0, 1.0)
    else:
        x_adv = x0.clone()
    for _ in range(max_iter):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + eps_step * grad.sign(), lower), upper)
    return x_adv


@hookimpl
def testbed_register_attacks(registry: KindRegistry) -> None:
    registry.add("fgsm", build_fgsm, params=FGSMParams, description="Fast gradient sign, 1 step")
    registry.add(
        "bim", build_bim, params=BIMParams, description="Basic iterative method, no random start"
    )
    registry.add(
        "pgd", build_pgd, params=PGDParams, description="Projected gradient descent, random start"
    )
