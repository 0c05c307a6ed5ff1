"""A repeat's pieces, built the same way by every engine (the Flower ClientApp rebuilds
its clients with these): the clients' data, the model, the per-run plugin objects."""

from __future__ import annotations

from typing import Any

import torch

from testbed.builtins.partitioners import split_train_test
from testbed.data import ImageDataset
from testbed.local_training import ClientData, LocalConfig, seeded
from testbed.pluginmanager import Host, PluginError
from testbed.poisoning_run import build_threat
from testbed.rundir import RunError
from testbed.scenario import Scenario
from testbed.server_data import RootSet, ServerData, carve_root_set, make_server_data, root_set_of
from testbed.state import InferenceBatch, derive_seed, generator


def _client_training_inputs(host: Host, cid: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    """A client's training images through its own input pipeline, if a plugin sets one."""
    if not host.pm.hook.testbed_training_inputs.get_hookimpls():
        return x
    batch = InferenceBatch(cid, x.float().div(255), generator(seed, "training-inputs", cid))
    host.hook.testbed_training_inputs(batch=batch)
    return batch.x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def make_clients(
    ds: ImageDataset, scenario: Scenario, host: Host, seed: int, device: torch.device
) -> list[ClientData]:
    n = scenario.federation.clients
    spec = scenario.partition
    partition = host.registry.build("partitioners", spec.name, spec.params)
    root = root_set_request(scenario, host)
    pool = None  # all of the dataset, unless the server holds a root set
    if root is not None:  # carved first, so that no client holds any of it
        keep = torch.ones(len(ds.y), dtype=torch.bool)
        keep[_carve(ds, scenario, root, seed)] = False
        pool = torch.nonzero(keep).flatten()
    try:
        parts = partition(ds.y if pool is None else ds.y[pool], n, generator(seed, "partition"))
    except ValueError as exc:  # the data cannot be split this way: a scenario mistake
        raise RunError(f"partitioner {spec.name!r}: {exc}") from None
    if problem := partition_problem(parts, n, len(ds.y) if pool is None else len(pool)):
        raise PluginError(f"partitioner {spec.name!r} {problem}")
    if pool is not None:
        parts = [pool[p] for p in parts]
    threat = build_threat(scenario, host, seed)  # compromised clients poison their data here
    clients = []
    for cid, idx in enumerate(parts):
        tr, te = split_train_test(idx, ds.y, spec.train_fraction, generator(seed, "split", cid))
        if len(tr) == 0 or len(te) == 0:
            raise RunError(
                f"client {cid} got {len(tr)} training and {len(te)} test images; "
                "use fewer clients or more data"
            )
        x_tr, y_tr = ds.x[tr], ds.y[tr]
        if threat is not None:
            x_tr, y_tr = threat.poison_data(cid, x_tr, y_tr, len(ds.classes), seed)
        x_train = _client_training_inputs(host, cid, x_tr, seed)
        on = [t.to(device) for t in (x_train, y_tr, ds.x[te], ds.y[te])]
        clients.append(ClientData(cid, *on))
    return clients


def partition_problem(parts: Any, n_clients: int, n_items: int) -> str | None:
    """Why ``parts`` is not a partition of ``range(n_items)`` into ``n_clients`` index
    tensors (the hookspec's contract), else None. An image in two clients' shares, or
    twice in one (then in its train and its test split), inflates accuracy and transfer."""
    if not isinstance(parts, list | tuple) or len(parts) != n_clients:
        got = len(parts) if isinstance(parts, list | tuple) else type(parts).__name__
        return f"returned {got} parts for {n_clients} clients"
    for cid, part in enumerate(parts):
        if not isinstance(part, torch.Tensor) or part.ndim != 1 or part.is_floating_point():
            return f"returned a part for client {cid} that is not a 1-D tensor of indices"
    flat = torch.cat([p.long() for p in parts]) if parts else torch.empty(0, dtype=torch.long)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= n_items):
        return f"returned indices outside 0..{n_items - 1}"
    if len(flat.unique()) != len(flat):
        return "gave an image to two clients, or twice to one"
    if len(flat) != n_items:
        return f"left {n_items - len(flat)} of {n_items} images to no client"
    return None


def root_set_request(scenario: Scenario, host: Host) -> RootSet | None:
    """The root set the scenario's aggregator asks the server to hold, if any."""
    agg = scenario.aggregator
    return root_set_of(host.registry.build("aggregators", agg.name, agg.params))


def _carve(ds: ImageDataset, scenario: Scenario, spec: RootSet, seed: int) -> torch.Tensor:
    try:
        return carve_root_set(ds.y, spec, seed)
    except ValueError as exc:  # e.g. a root set as large as the dataset
        raise RunError(f"aggregator {scenario.aggregator.name!r}: {exc}") from None


def make_server(
    ds: ImageDataset,
    scenario: Scenario,
    aggregator: object,
    seed: int,
    device: torch.device,
    model: torch.nn.Module,
    cfg: LocalConfig,
) -> ServerData | None:
    """The server's root set and its training, for an aggregator that declares
    ``root_set`` (the same examples ``make_clients`` kept from every client); else None."""
    spec = root_set_of(aggregator)
    if spec is None:
        return None
    _carve(ds, scenario, spec, seed)  # one-line errors, as in make_clients
    return make_server_data(spec, ds.x, ds.y, len(ds.classes), seed, model, cfg, device)


def _check_outputs(model: torch.nn.Module, name: str, ds: ImageDataset) -> None:
    """One image through the model in eval mode (no state kept): a model with another
    number of outputs than classes would train, its argmax naming classes the task lacks."""
    expected = (1, len(ds.classes))
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, ds.channels, ds.image_size, ds.image_size))
    except Exception as exc:  # a plugin model's bug: one line, not a traceback mid-run
        raise RunError(f"model {name!r} fails on one image: {type(exc).__name__}: {exc}") from exc
    model.train(was_training)
    if tuple(getattr(out, "shape", ())) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RunError(f"model {name!r} returns {got} for one image, expected {expected}")


def build_model(scenario: Scenario, host: Host, ds: ImageDataset, seed: int) -> torch.nn.Module:
    mean, std = ds.channel_stats()
    spec = scenario.model
    with seeded(derive_seed(seed, "init"), torch.device("cpu")):
        try:
            model = host.registry.build(
                "models",
                spec.name,
                spec.params,
                in_channels=ds.channels,
                image_size=ds.image_size,
                num_classes=len(ds.classes),
                mean=mean,
                std=std,
            )
        except ValueError as exc:  # e.g. images too small for the model's poolings
            raise RunError(f"model {spec.name!r}: {exc}") from None
        _check_outputs(model, spec.name, ds)  # seeded too: lazy layers initialise here
    return model


def plugin_states(objs: list[object]) -> list[Any]:
    return [o.state_dict() if hasattr(o, "state_dict") else None for o in objs]


def load_plugin_states(objs: list[object], states: list[Any]) -> None:
    for o, st in zip(objs, states, strict=True):
        if st is not None:
            o.load_state_dict(st)  # type: ignore[attr-defined]


def per_run_objects(scenario: Scenario, host: Host) -> list[object]:
    """A fresh DP mechanism and defence objects for one repeat (they hold its state)."""
    specs = [
        (k, spec) for _, k, spec in scenario.components() if k in ("dp_mechanisms", "defences")
    ]
    objs = [host.registry.build(kind, spec.name, spec.params) for kind, spec in specs]
    # testbed_local_training is firstresult: a second trainer would silently never run.
    trainers = [
        s.name
        for (_, s), o in zip(specs, objs, strict=True)
        if hasattr(o, "testbed_local_training")
    ]
    if len(trainers) > 1:
        raise RunError(
            f"{' and '.join(trainers)} both replace local training; only one can run per client"
        )
    return objs
