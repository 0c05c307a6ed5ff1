"""Local DP-SGD (Abadi et al. 2016) with Opacus inside each client's local training.

Every sampled client trains its copy of the model with Opacus' ``PrivacyEngine``: each
step draws a Poisson sample of its images (rate q = 1 / batches per epoch), clips every
example's gradient to L2 norm C (``max_grad_norm``), sums them, adds Gaussian noise of
std z * C and divides by the expected batch size. The guarantee is example-level (add or
remove one of the client's images) for everything the client ever uploads, so it also
holds against the server and every other client; it is per client, because clients hold
disjoint data. Each client's Opacus accountant lives as long as the run (checkpointed
with it) and composes all of the client's steps over all the rounds it was sampled in.

``grad_sample_mode`` picks how Opacus obtains the per-example gradient norms; all three
clip every example's full gradient to C and add the same noise, so the guarantee is the
same: "hooks" and "functorch" materialise per-example gradients, "ghost" (fast gradient
clipping with ghost clipping) computes the norms of linear layers' per-example gradients
without materialising them and then runs a second backward pass on the reweighted loss.
On the paper CNN, whose first FC layer has 9.4 M weights, ghost is the fastest (see
benchmarks/bench_dpsgd.py), hence the default.

The engine's model is never wrapped: training runs on a deep copy whose trained weights
are copied back into the engine's model in place. Randomness comes from the engine's
per-client ``generator`` (augmentation, and seeds for Poisson sampling and DP noise) and
the seeded global RNG (dropout), so a seed reproduces a run exactly on a given device.

This module holds the parameters, the local-training hook and the registration; the
per-client accounting, the privacy statement and the checkpointed state are in
dpsgd_accounting.py (``DPSGDAccounting``, which ``DPSGD`` extends), and the forward and
backward steps with per-example clipping in dpsgd_steps.py.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from testbed import hookimpl
from testbed.builtins.dpsgd_accounting import DPSGDAccounting, _opacus_rate
from testbed.builtins.dpsgd_steps import Step, _lean_ghost_step, _opacus_step
from testbed.data import augment
from testbed.local_training import ClientData, LocalConfig
from testbed.registry import KindRegistry, Params
from testbed.state import RoundContext
from testbed.strict import check_noise_std


class DPSGDParams(Params):
    noise_multiplier: float | None = Field(
        None, ge=0, description="z: noise std is z * max_grad_norm per step (or target_epsilon)."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Instead of z: the noise multiplier that spends this epsilon over all "
        "planned steps (rounds x local epochs x batches per epoch), as Opacus' "
        "make_private_with_epsilon; a client sampled in fewer rounds spends less.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="C: bound on each example's gradient.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (eps, delta).")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant composing each client's steps."
    )
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = Field(
        "ghost",
        description="How Opacus gets per-example gradient norms; same guarantee, different "
        "speed (ghost is fastest on the paper CNN).",
    )
    budget_epsilon: float | None = Field(
        None,
        gt=0,
        description="A client stops training (uploads a zero update) once another round "
        "would take its epsilon above this; None: no budget.",
    )
    poisson_sampling: bool = Field(
        True,
        description="Poisson-sampled batches, as the accountant assumes; False: shuffled "
        "fixed-size batches (the reported epsilon is then an approximation).",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPSGDParams:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.budget_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("budget_epsilon needs noise: with noise_multiplier 0 no client trains")
        if self.noise_multiplier is not None:
            check_noise_std(
                self.noise_multiplier * self.max_grad_norm, "noise_multiplier x max_grad_norm"
            )
        return self


class DPSGD(DPSGDAccounting):
    """The dp_sgd mechanism: Opacus' DP-SGD in each sampled client's local training.
    Accounting, the privacy statement and checkpoint state are inherited from
    ``DPSGDAccounting`` (dpsgd_accounting.py)."""

    name = "dp_sgd"

    lean_ghost = True
    """Ghost mode with testbed's leaner driver of Opacus' two backward passes (see
    ``_lean_ghost_step`` in dpsgd_steps.py); False: Opacus' own. Same per-example norms,
    clipping and noise; a switch for benchmarks/bench_dpsgd.py."""

    # ----------------------------------------------------------------------------------
    # Local training
    # ----------------------------------------------------------------------------------

    @hookimpl
    def testbed_local_training(
        self,
        ctx: RoundContext,
        model: nn.Module,
        data: ClientData,
        cfg: LocalConfig,
        generator: torch.Generator,
    ) -> float:
        cid = data.client_id
        n = data.n_train
        device = data.x_train.device
        batches = math.ceil(n / min(cfg.batch_size, n))
        per_epoch, sample_rate = _opacus_rate(n, batches, self.p.poisson_sampling)
        steps = cfg.epochs * per_epoch
        z = self._noise_for(cid, sample_rate, ctx.rounds * steps)
        if cid in self.stopped or self._over_budget(cid, z, sample_rate, steps):
            self.stopped.setdefault(cid, ctx.round)
            self.round_steps[cid] = 0
            return _held_loss(model, data, cfg.batch_size)  # weights untouched: zero update

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(
                "model not supported by Opacus' DP-SGD: "
                + "; ".join(map(str, errors))
                + " (BatchNorm mixes examples of a batch; use norm = 'group')"
            )

        seeds = torch.randint(0, 2**62, (2,), generator=generator).tolist()
        sampling_g = torch.Generator().manual_seed(seeds[0])
        noise_g = torch.Generator(device=device).manual_seed(seeds[1])
        # The loader yields indices (CPU); images are gathered on the data's device.
        loader = DataLoader(
            TensorDataset(torch.arange(n)),
            batch_size=min(cfg.batch_size, n),
            shuffle=not self.p.poisson_sampling,
            generator=sampling_g,
        )
        local = copy.deepcopy(model)
        for m in local.modules():
            # Opacus' backward hooks forbid in-place ops on a hooked layer's output
            # (the paper CNN's ReLU(inplace=True)); same maths, one more tensor.
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        local.train()
        opt = torch.optim.SGD(
            local.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        engine = _engine(self.p.accountant)
        engine.accountant = self._accountant(cid)  # Opacus' step hook composes into it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
            out = engine.make_private(
                module=local,
                optimizer=opt,
                criterion=nn.CrossEntropyLoss(),
                data_loader=loader,
                noise_multiplier=z,
                max_grad_norm=self.p.max_grad_norm,
                poisson_sampling=self.p.poisson_sampling,
                grad_sample_mode=self.p.grad_sample_mode,
                noise_generator=noise_g,
            )
        if self.p.grad_sample_mode == "ghost":
            dp_model, dp_opt, criterion, dp_loader = out
            step = _lean_ghost_step(dp_model) if self.lean_ghost else _opacus_step(criterion)
        else:
            dp_model, dp_opt, dp_loader = out
            step = _opacus_step(nn.CrossEntropyLoss())

        try:
            taken, loss_sum, seen = self._epochs(
                dp_model, dp_opt, dp_loader, step, data, cfg, generator
            )
        finally:
            dp_model.cleanup()  # Opacus' hooks and per-parameter attributes
        if taken != steps:
            raise RuntimeError(f"dp_sgd: planned {steps} steps, took {taken}")
        with torch.no_grad():
            for dst, src in zip(model.parameters(), local.parameters(), strict=True):
                dst.copy_(src)
        self.round_steps[cid] = taken
        return float(loss_sum) / max(seen, 1)

    def _epochs(
        self,
        dp_model: Any,
        dp_opt: Any,
        dp_loader: DataLoader,
        step: Step,
        data: ClientData,
        cfg: LocalConfig,
        generator: torch.Generator,
    ) -> tuple[int, torch.Tensor, int]:
        device = data.x_train.device
        aug = cfg.augment
        loss_sum, seen, taken = torch.zeros((), device=device), 0, 0
        with warnings.catch_warnings():
            # Opacus' hooks fire on layer outputs when the images need no gradient, which
            # is all they use.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(cfg.epochs):
                for (idx,) in dp_loader:
                    idx = idx.to(device)
                    x = data.x_train[idx].float().div_(255)
                    x = augment(x, generator, aug.hflip, aug.vflip, aug.rotate_degrees)
                    y = data.y_train[idx]
                    dp_opt.zero_grad(set_to_none=True)
                    if len(idx) == 0 and self.p.grad_sample_mode == "functorch":
                        # Poisson sampling drew no image (the step still adds noise and
                        # counts); Opacus' functorch path cannot vmap over an empty batch.
                        for p in dp_model.parameters():
                            if p.requires_grad:
                                p.grad_sample = p.new_zeros((0, *p.shape))
                        loss = None
                    else:
                        loss = step(dp_model, x, y)
                    dp_opt.step()  # clip, add noise, step the client's accountant
                    taken += 1
                    if loss is not None and len(idx):
                        loss_sum += loss * len(idx)
                        seen += len(idx)
        return taken, loss_sum, seen


@torch.no_grad()
def _held_loss(model: nn.Module, data: ClientData, batch_size: int) -> float:
    """A stopped client's reported loss: that of the model it holds, on its training images
    (the round record needs a number; nothing leaves the client)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=data.x_train.device)
    for start in range(0, data.n_train, batch_size):
        x = data.x_train[start : start + batch_size].float().div_(255)
        y = data.y_train[start : start + batch_size]
        total += nn.functional.cross_entropy(model(x), y, reduction="sum")
    model.train(was_training)
    return float(total) / max(data.n_train, 1)


def _engine(accountant: str) -> PrivacyEngine:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant=accountant)


@hookimpl
def testbed_register_dp_mechanisms(registry: KindRegistry) -> None:
    registry.add(
        "dp_sgd",
        DPSGD,
        params=DPSGDParams,
        description="Local DP-SGD with Opacus per client: per-example clipping + noise",
    )
