"""The client's half of a federated round, as plain functions of explicit state.

`client_step` takes the weights the client received, its data, the round context (which
carries the seed every random choice derives from) and configuration, and returns the
update; nothing is kept between calls, so any engine can drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from testbed.data import augment
from testbed.pluginmanager import PluginError, implementers_text
from testbed.scenario import Augment
from testbed.state import ClientUpdate, RoundContext, derive_seed


@dataclass(frozen=True)
class LocalConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: Augment


@dataclass(frozen=True)
class ClientData:
    client_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


def get_weights(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


@torch.no_grad()
def set_weights(model: nn.Module, weights: torch.Tensor) -> None:
    """Copy into the parameters' own storage (torch's vector_to_parameters would make them
    views of `weights`, so training would silently overwrite the caller's tensor)."""
    start = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(weights[start : start + n].view_as(p))
        start += n
    if start != weights.numel():
        raise ValueError(f"weights have {weights.numel()} values, the model {start}")


@contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's global RNG (dropout draws from it) without leaking to the caller."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def batches(
    data: ClientData, cfg: LocalConfig, g: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The client's local training batches, shuffled and augmented, drawn from ``g``: every
    engine trains on exactly these (the batched one client by client, in the same order)."""
    aug = cfg.augment
    device = data.x_train.device
    for _ in range(cfg.epochs):
        order = torch.randperm(data.n_train, generator=g).to(device)
        for start in range(0, data.n_train, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = data.x_train[idx].float().div_(255)
            yield augment(x, g, aug.hflip, aug.vflip, aug.rotate_degrees), data.y_train[idx]


Trainer = Callable[[nn.Module, ClientData, LocalConfig, torch.Generator], float]
"""Plain local training, (model, data, config, generator) -> mean loss: `local_sgd`, or an
engine's faster equivalent (`testbed.captured.CapturedSGD`)."""


def local_sgd(model: nn.Module, data: ClientData, cfg: LocalConfig, g: torch.Generator) -> float:
    """Plain local training: SGD over shuffled, augmented batches; returns the mean loss."""
    device = data.x_train.device
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loss_sum, seen = torch.zeros((), device=device), 0
    for x, y in batches(data, cfg, g):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
    return float(loss_sum) / max(seen, 1)


def client_step(
    model: nn.Module,
    received: torch.Tensor,
    data: ClientData,
    cfg: LocalConfig,
    ctx: RoundContext,
    hooks: Any,
    trainer: Trainer = local_sgd,
) -> ClientUpdate:
    """Local training from the weights the client received; returns its (hooked) update.
    ``trainer`` does the plain training a `testbed_local_training` plugin does not take over."""
    set_weights(model, received)
    model.train()
    g = ctx.generator("local", data.client_id)
    with seeded(derive_seed(ctx.seed, ctx.round, "dropout", data.client_id), received.device):
        loss = hooks.testbed_local_training(ctx=ctx, model=model, data=data, cfg=cfg, generator=g)
        if loss is None:
            loss = trainer(model, data, cfg, g)
        elif isinstance(loss, bool) or not isinstance(loss, int | float | torch.Tensor):
            raise PluginError(
                f"plugin {implementers_text(hooks, 'testbed_local_training')} returned "
                f"{type(loss).__name__} from testbed_local_training, expected the mean loss"
            )
        elif isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise PluginError(
                f"plugin {implementers_text(hooks, 'testbed_local_training')} returned a tensor of "
                f"shape {tuple(loss.shape)} from testbed_local_training, expected the mean loss"
            )
    delta = get_weights(model) - received
    update = ClientUpdate(data.client_id, delta, data.n_train, float(loss))
    hooks.testbed_client_update(ctx=ctx, update=update)
    return update
