"""The outsider (issue 13): an adversary without the federated model. It trains a surrogate
of the same architecture only on its own training data, crafts every configured attack on
that surrogate, and the examples are scored on every client's federated model: pure
transfer, to set beside the insider's (Papernot et al., "Transferability in Machine
Learning: from Phenomena to Black-Box Attacks using Adversarial Samples", 2016).

Nothing here touches the federation: the surrogates are trained after it, from seeds of
their own, so adding `[outsider]` to a scenario never retrains (or changes) the federation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from testbed.local_training import ClientData, LocalConfig, local_sgd
from testbed.metrics import accuracy, predicted
from testbed.state import generator
from testbed.transfer import Deployed, deploy, run_attack


def train_surrogate(
    build: Callable[[], nn.Module],
    data: ClientData,
    cfg: LocalConfig,
    *,
    seed: int,
    device: torch.device,
) -> nn.Module:
    """A fresh model from ``build`` (which seeds its own initialisation, apart from the
    federation's) trained by plain local SGD on one client's training data only."""
    model = build().to(device)
    model.train()
    local_sgd(model, data, cfg, generator(seed, "outsider-train", data.client_id))
    return model


def surrogate_accuracy(model: nn.Module, data: ClientData) -> float:
    """The surrogate's accuracy on its owner's own test split (how good a copy it is)."""
    with torch.no_grad():
        pred = predicted(model(data.x_test.float().div(255)))
    return accuracy(pred, data.y_test)


def run_outsider(
    attacks: Sequence[Any],
    deployed: Sequence[Deployed],
    clients: Sequence[ClientData],
    adversaries: Sequence[int],
    build: Callable[[], nn.Module],
    cfg: LocalConfig,
    epochs: int,
    registry: Any,
    hooks: Any,
    *,
    seed: int,
    samples: int,
    num_classes: int,
    device: torch.device,
    classes: Sequence[str] = (),
    done: dict[str, Any] | None = None,
    on_attack_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every attack crafted on each adversary's surrogate and scored on every federated
    model. ``done`` holds results of a previous, interrupted call (they are kept);
    ``on_attack_done`` gets the results so far after each attack (for checkpoints)."""
    results: dict[str, Any] = dict(done or {})
    todo = [spec for spec in attacks if spec.label not in results]
    if not todo:
        return results
    # the federation's local-training settings, for as many epochs as the outsider trains
    local = replace(cfg, epochs=epochs)
    surrogates: dict[int, nn.Module] = {}
    accuracy: dict[str, float] = {}
    for a in adversaries:
        model = train_surrogate(build, clients[a], local, seed=seed, device=device)
        (frozen,) = deploy([model])
        surrogates[a] = frozen.model
        accuracy[str(a)] = surrogate_accuracy(frozen.model, clients[a])
    for spec in todo:
        result, _ = run_attack(
            spec,
            deployed,
            clients,
            adversaries,
            registry,
            hooks,
            seed=seed,
            samples=samples,
            num_classes=num_classes,
            device=device,
            classes=classes,
            crafting=surrogates,
        )
        result["surrogate_acc"] = accuracy
        results[spec.label] = result
        if on_attack_done:
            on_attack_done(results)
    return results
