"""The ClientApp every site runs: testbed's `client_step` on the site's own client data.

A site (a Ray actor in simulation, a SuperNode's app process in deployment) rebuilds the
federation's clients from the run description the server sends, once per run: the same
dataset plugin, partition and per-client pipelines as the in-process engine, with the
data root of the message or the node's ``data-root`` node config. Per-run plugin objects
(DP-SGD, adversarial training, clipping) run here; what they keep per client travels
with the messages (``client_state``), so the server's copy stays the reference one.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from testbed.flower.messages import (
    TRAIN_CONFIG,
    client_states,
    from_record,
    load_client_states,
    pack,
    to_record,
    unpack,
)
from testbed.local_training import ClientData, LocalConfig, client_step
from testbed.pluginmanager import Host, build_host
from testbed.state import RoundContext

ERROR_CODE = 1000
"""Flower error code of a testbed failure on the client (user errors and plugin faults)."""


@dataclass
class Site:
    host: Host
    per_run: list[object]
    clients: list[ClientData]
    model: torch.nn.Module
    cfg: LocalConfig
    device: torch.device
    exits: ExitStack


_site: tuple[str, Site] | None = None
"""This process's current run (one at a time: a new run replaces it)."""


def _open_site(run: dict[str, Any], data_root: str | None) -> Site:
    from testbed.assemble import build_model, make_clients, per_run_objects
    from testbed.scenario_load import validate_document

    torch.set_num_threads(run["threads"])
    host = build_host(extra_modules=run["modules"])
    scenario = validate_document(run["scenario"], host.registry, "<flower run>")
    task = next(t for t in scenario.task_list() if t.name == run["task"])
    seed, device = run["seed"], torch.device(run["device"])
    spec = task.data
    root = Path(data_root) if data_root else None
    ds = host.registry.build("datasets", spec.name, spec.params, data_root=root)
    per_run = per_run_objects(scenario, host)
    exits = ExitStack()
    exits.enter_context(host.active(per_run))
    fed = scenario.federation
    cfg = LocalConfig(
        fed.local_epochs, fed.batch_size, fed.lr, fed.momentum, fed.weight_decay, spec.augment
    )
    clients = make_clients(ds, scenario, host, seed, device)
    model = build_model(scenario, host, ds, seed).to(device)
    return Site(host, per_run, clients, model, cfg, device, exits)


def site_for(blob: bytes, run: dict[str, Any], data_root: str | None) -> Site:
    global _site
    key = hashlib.sha256(bytes(blob) + str(data_root).encode()).hexdigest()
    if _site is None or _site[0] != key:
        if _site is not None:
            _site[1].exits.close()
            _site = None
        _site = (key, _open_site(run, data_root))
    return _site[1]


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (its ``partition-id`` node config)."""
    pid = context.node_config.get("partition-id")
    if pid is None:
        return Message(
            Error(ERROR_CODE, "this node has no partition-id in its node config"), reply_to=msg
        )
    conf = ConfigRecord({"partition-id": int(pid)})
    return Message(RecordDict({"config": conf}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except Exception as exc:  # one line for the server's error report, not a traceback
        return Message(Error(ERROR_CODE, f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    conf = msg.content[TRAIN_CONFIG]
    desc = unpack(conf["run"])
    data_root = context.node_config.get("data-root") or desc["data_root"]
    site = site_for(conf["run"], desc, data_root)
    cid = int(conf["client"])
    load_client_states(site.per_run, cid, unpack(conf["states"]))
    sampled = tuple(int(c) for c in conf["sampled"])
    ctx = RoundContext(
        seed=int(desc["seed"]),
        round=int(conf["round"]),
        rounds=int(desc["scenario"]["federation"]["rounds"]),
        n_clients=len(site.clients),
        sampled=sampled,
        weights=dict(zip(sampled, (float(w) for w in conf["weights"]), strict=True)),
    )
    received = from_record(msg.content["arrays"], site.device)
    update = client_step(site.model, received, site.clients[cid], site.cfg, ctx, site.host.hook)
    reply = ConfigRecord(
        {
            "client": cid,
            "info": pack(update.info),
            "states": pack(client_states(site.per_run, cid)),
        }
    )
    metrics = MetricRecord({"loss": float(update.loss), "n_train": update.n_train})
    content = RecordDict(
        {"arrays": to_record(update.delta), "metrics": metrics, TRAIN_CONFIG: reply}
    )
    return Message(content, reply_to=msg)
