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
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from testbed import hookimpl
from testbed.data import augment
from testbed.federation import ClientData, LocalConfig
from testbed.privacy import ALL_RECIPIENTS, ONE_RECIPIENT, SERVER, opacus_epsilon, viewpoints
from testbed.registry import KindRegistry, Params
from testbed.state import RoundContext


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
        return self


def _opacus_rate(n: int, batches: int, poisson: bool) -> tuple[int, float]:
    """(steps per epoch, sample rate) exactly as Opacus runs and accounts them. Its
    ``DPDataLoader`` samples with rate 1 / batches but runs int(1 / (1 / batches)) steps,
    which float rounding makes batches - 1 for some counts (93, 99, 105, ...), and
    ``make_private`` then steps the accountant with q = 1 / len(loader) = 1 / steps per
    epoch. Calibrating ``target_epsilon`` or checking ``budget_epsilon`` with 1 / batches
    would disagree with the epsilon Opacus reports (3.021 for a target of 3.0)."""
    if not poisson:
        return batches, 1 / batches
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=1 / batches)
    return len(sampler), 1 / len(sampler)


def _history_to_state(acc: IAccountant) -> dict[str, Any]:
    """An accountant's state as lists, floats and str only (torch.load(weights_only))."""
    return {
        "mechanism": acc.mechanism(),
        "history": [[float(z), float(q), int(n)] for z, q, n in acc.history],
    }


class DPSGD:
    name = "dp_sgd"

    lean_ghost = True
    """Ghost mode with testbed's leaner driver of Opacus' two backward passes (see
    ``_lean_ghost_step``); False: Opacus' own. Same per-example norms, clipping and noise;
    a switch for benchmarks/bench_dpsgd.py."""

    def __init__(self, p: DPSGDParams) -> None:
        self.p = p
        self.accountants: dict[int, IAccountant] = {}
        self.noise: dict[int, float] = {}
        """Per-client noise multiplier (differs by client size with target_epsilon)."""
        self.stopped: dict[int, int] = {}
        """Client -> first round it skipped because of budget_epsilon."""
        self.rounds = 0
        self.round_steps: dict[int, int] = {}

    # ----------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------

    def _accountant(self, cid: int) -> IAccountant:
        if cid not in self.accountants:
            self.accountants[cid] = create_accountant(self.p.accountant)
        return self.accountants[cid]

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        key = tuple((float(z), float(q), int(k)) for z, q, k in history)
        return opacus_epsilon(self.p.accountant, self.p.delta, key)

    def epsilon_of(self, cid: int) -> float:
        acc = self.accountants.get(cid)
        return 0.0 if acc is None else self._epsilon(acc.history)

    def _noise_for(self, cid: int, sample_rate: float, planned_steps: int) -> float:
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier
        if cid not in self.noise:
            # make_private_with_epsilon's calibration, over the whole run's planned steps
            # (its bisection tries huge multipliers, whose optimum is the largest order).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                self.noise[cid] = float(
                    get_noise_multiplier(
                        target_epsilon=self.p.target_epsilon,
                        target_delta=self.p.delta,
                        sample_rate=sample_rate,
                        steps=planned_steps,
                        accountant=self.p.accountant,
                    )
                )
        return self.noise[cid]

    def _over_budget(self, cid: int, z: float, sample_rate: float, steps: int) -> bool:
        """Would this round's steps take the client's epsilon above budget_epsilon?"""
        if self.p.budget_epsilon is None:
            return False
        history = self._accountant(cid).history
        if history and history[-1][:2] == (z, sample_rate):  # as Opacus' step merges them
            trial = [*history[:-1], (z, sample_rate, history[-1][2] + steps)]
        else:
            trial = [*history, (z, sample_rate, steps)]
        return self._epsilon(trial) > self.p.budget_epsilon

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

    # ----------------------------------------------------------------------------------
    # Reporting and checkpoints
    # ----------------------------------------------------------------------------------

    def _noise_reported(self) -> float:
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier
        return min(self.noise.values(), default=math.nan)

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        self.rounds += 1
        clients = range(max(ctx.n_clients, max(self.accountants, default=-1) + 1))
        record[self.name] = {
            "epsilon": {str(c): self.epsilon_of(c) for c in clients},
            "stopped": {str(c): c in self.stopped for c in clients},
            "stopped_this_round": sorted(
                c for c, r in self.stopped.items() if r == ctx.round and c in ctx.sampled
            ),
            "steps": {str(c): s for c, s in sorted(self.round_steps.items())},
            "noise_multiplier": {
                str(c): self.noise.get(c, self._noise_reported()) for c in clients
            },
        }
        self.round_steps = {}

    @hookimpl
    def testbed_privacy_spent(self) -> dict[str, Any]:
        n = max(self.accountants, default=-1) + 1
        per_client = [self.epsilon_of(c) for c in range(n)]
        note = (
            "example-level DP-SGD per client (each client's images); epsilon is the worst "
            f"client's; per-example gradients clipped to C, noise z*C ({self.p.grad_sample_mode})"
        )
        if not self.p.poisson_sampling:
            note += "; shuffled batches, not Poisson: the epsilon is an approximation"
        if self.stopped:
            note += f"; clients {sorted(self.stopped)} stopped at budget_epsilon"
        eps = max(per_client, default=0.0)
        sampling = "poisson over each client's images, q = 1 / batches per epoch"
        if not self.p.poisson_sampling:
            sampling = "shuffled fixed-size batches (accounted as if Poisson: approximate)"
        return {
            "mechanism": self.name,
            "level": "example",
            # Noise is added on the client: everything it uploads is private, so the
            # guarantee holds against the server and every other client alike.
            "against": SERVER,
            "sampling": sampling,
            "epsilon": eps,
            "epsilon_by_viewpoint": viewpoints(
                {SERVER: eps, ONE_RECIPIENT: eps, ALL_RECIPIENTS: eps}
            ),
            "epsilon_per_client": per_client,
            "delta": self.p.delta,
            "accountant": self.p.accountant,
            "clip_norm": self.p.max_grad_norm,
            "noise_multiplier": self._noise_reported(),
            "noise_multiplier_per_client": [self.noise.get(c) for c in range(n)]
            if self.p.noise_multiplier is None
            else None,
            "stopped_clients": {str(c): r for c, r in sorted(self.stopped.items())},
            "rounds_accounted": self.rounds,
            "note": note,
        }

    def client_state(self, cid: int) -> dict[str, Any]:
        """What this object keeps about one client, for an engine that trains the client in
        another process (Flower): its accountant, noise multiplier, stop round and steps."""
        acc = self.accountants.get(cid)
        return {
            "accountant": None if acc is None else _history_to_state(acc),
            "noise": self.noise.get(cid),
            "stopped": self.stopped.get(cid),
            "steps": self.round_steps.get(cid),
        }

    def load_client_state(self, cid: int, state: dict[str, Any]) -> None:
        for attr, value in (
            ("accountants", None if state["accountant"] is None else
             self._accountant_from(state["accountant"])),
            ("noise", state["noise"]),
            ("stopped", state["stopped"]),
            ("round_steps", state["steps"]),
        ):  # fmt: skip
            table = getattr(self, attr)
            if value is None:
                table.pop(cid, None)
            else:
                table[cid] = value

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the per-client accounting after a crash."""
        return {
            "accountants": {str(c): _history_to_state(a) for c, a in self.accountants.items()},
            "noise": {str(c): z for c, z in self.noise.items()},
            "stopped": {str(c): r for c, r in self.stopped.items()},
            "rounds": self.rounds,
        }

    def _accountant_from(self, st: dict[str, Any]) -> IAccountant:
        acc = create_accountant(self.p.accountant)
        if st["mechanism"] != acc.mechanism():
            raise ValueError(f"saved accountant {st['mechanism']!r}, scenario {acc.mechanism()!r}")
        acc.history = [(float(z), float(q), int(k)) for z, q, k in st["history"]]
        return acc

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountants = {
            int(c): self._accountant_from(st) for c, st in state["accountants"].items()
        }
        self.noise = {int(c): float(z) for c, z in state["noise"].items()}
        self.stopped = {int(c): int(r) for c, r in state["stopped"].items()}
        self.rounds = int(state["rounds"])
        self.round_steps = {}


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


# --------------------------------------------------------------------------------------
# Training steps: forward, backward and per-example clipping (the optimizer adds noise)
# --------------------------------------------------------------------------------------

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _opacus_step(criterion: Any) -> Step:
    """Opacus as documented: hooks/functorch, or ghost's wrapped criterion whose
    ``backward`` runs both passes."""

    def step(dp_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = criterion(dp_model(x), y)
        loss.backward()
        return loss.detach()

    return step


def _lean_ghost_step(dp_model: Any) -> Step:
    """Opacus' ghost clipping (``DPTensorFastGradientClipping.backward``) without work it
    throws away. Pass 1 only has to run Opacus' hooks, which compute each example's
    gradient norm from layer inputs and output gradients: asking autograd for the
    gradient w.r.t. the images skips the weight gradients Opacus computes and discards
    there. Pass 2, on the loss reweighted by the clipping factors min(1, C / norm), asks
    for the weight gradients only. Convolutions' per-example gradients (needed for their
    norms) come from one grouped convolution instead of unfold + bmm
    (``_conv2d_grad_sample``). The norms, the clipping and therefore the guarantee are
    Opacus' own; tests/test_dpsgd.py checks the update against hooks mode."""
    samplers = dict(dp_model.GRAD_SAMPLERS)
    samplers[nn.Conv2d] = _conv2d_grad_sample
    dp_model.GRAD_SAMPLERS = samplers  # this wrapper only, not Opacus' registry
    params = [p for p in dp_model.parameters() if p.requires_grad]

    def step(dp_model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        per_example = nn.functional.cross_entropy(dp_model(x), y, reduction="none")
        torch.autograd.grad(per_example.mean(), x, retain_graph=True)  # hooks: norms
        coef = dp_model.get_clipping_coef().to(per_example.device)
        dp_model.disable_hooks()
        try:
            torch.autograd.backward((coef * per_example).sum(), inputs=params)
        finally:
            dp_model.enable_hooks()
        return per_example.detach().mean()

    return step


def _conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a Conv2d as the weight gradient of one convolution with
    the batch folded into groups; faster than Opacus' unfold + bmm on CPU for layers with
    many input channels, which would materialise batch x C_in*k*k x H*W. Opacus' own for
    the rest."""
    a = activations[0]
    n = a.shape[0]
    if n == 0 or layer.groups != 1 or isinstance(layer.padding, str) or layer.in_channels < 16:
        return compute_conv_grad_sample(layer, activations, backprops)
    a = a.to(backprops.dtype)
    o, i = layer.out_channels, layer.in_channels
    weight = layer.weight.detach().repeat(n, 1, 1, 1)
    _, gw, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * o, *backprops.shape[2:]),
        a.reshape(1, n * i, *a.shape[2:]),
        weight,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        n,
        [False, True, False],
    )
    out = {layer.weight: gw.view(n, *layer.weight.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


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
