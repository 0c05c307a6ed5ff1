"""One (task, seed) of a run: train the federation, or take it from a checkpoint or the
federation cache, then evaluate it (clean accuracy, attacks, outsider, poisoning).
`testbed.runner` runs these for every task and seed and writes the run folder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from testbed.assemble import (
    build_model,
    load_plugin_states,
    make_clients,
    make_server,
    per_run_objects,
    plugin_states,
)
from testbed.cache import BadEntry, FederationCache, check_entry, training_key
from testbed.data import ImageDataset
from testbed.engines import Engine, TrainingSetup
from testbed.explain import explain_for_run
from testbed.federation import FederationState, UpdatePolicy
from testbed.fingerprint import check_code_unchanged
from testbed.hostinfo import differences, float_path
from testbed.local_training import ClientData, LocalConfig, get_weights, set_weights
from testbed.metrics import client_model_spread
from testbed.outsider import run_outsider
from testbed.pluginmanager import Host, PluginError, implementers_text
from testbed.poisoning_run import build_threat, poisoning_metrics, threat_key, threat_warnings
from testbed.privacy import record_problem
from testbed.progress import Bars
from testbed.robust_eval import evaluate_repeat
from testbed.rundir import Checkpoints, RunError, safe_name, torch_save_atomic
from testbed.scenario import Scenario, Task
from testbed.state import derive_seed
from testbed.threat import malicious_clients
from testbed.transfer import clean_accuracy, deploy, run_attack

log = logging.getLogger("testbed")


@dataclass(frozen=True)
class Repeat:
    """One (task, seed) of a run and where its results go."""

    scenario: Scenario
    task: Task
    host: Host
    ds: ImageDataset
    seed: int
    device: torch.device
    data_root: Path | None
    engine: Engine
    bars: Bars
    ckpt: Checkpoints
    label: str
    cache: FederationCache
    use_cache: bool
    examples_dir: Path
    data_fp: str
    """The decoded dataset's content fingerprint."""
    code_fp: dict[str, str]
    """Module -> source digest of testbed and every loaded plugin."""
    warn: Callable[[str], None]


def training_defences(scenario: Scenario, host: Host) -> list[dict[str, Any]]:
    """The defences that act during training: the only ones the cache key depends on."""
    reg = host.registry["defences"]
    return [
        d.model_dump(mode="json") for d in scenario.defences if reg.get(d.name).stage != "inference"
    ]


def _load_cached(job: Repeat, key: str, numel: int) -> dict[str, Any] | None:
    """A usable cache entry, or None; a bad entry is discarded with a warning."""
    fed = job.scenario.federation
    try:
        cached = job.cache.load(key)
        if cached is not None:
            check_entry(cached, clients=fed.clients, rounds=fed.rounds, numel=numel)
    except BadEntry as exc:
        job.warn(f"cache entry {key} discarded ({exc}); retraining")
        log.warning("%s seed %d: cache entry %s discarded: %s", job.task.name, job.seed, key, exc)
        job.cache.discard(key)
        return None
    return cached


def _load_checkpoint(job: Repeat, numel: int) -> dict[str, Any] | None:
    saved = job.ckpt.load_training(job.task.name, job.seed)
    if saved is not None:
        try:
            check_entry(
                {**saved, "privacy": []},
                clients=job.scenario.federation.clients,
                rounds=int(saved["round"]),
                numel=numel,
            )
        except (BadEntry, TypeError, ValueError) as exc:
            raise RunError(
                f"the training checkpoint of {job.task.name} seed {job.seed} does not belong "
                f"to this run ({exc})"
            ) from None
    return saved


def adversaries_of(scenario: Scenario, seed: int) -> list[int]:
    """The clients that craft attacks in the repeat of ``seed`` (the threat model's)."""
    n, adv = scenario.federation.clients, scenario.threat_model.adversaries
    if adv == "rotate":
        return list(range(n))
    if adv == "malicious":
        return list(malicious_clients(scenario.threat_model, n, seed))
    return list(adv)


def run_repeat(job: Repeat) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    per_run = per_run_objects(job.scenario, job.host)
    with job.host.active(per_run):
        return _run_repeat(job, per_run)


def _run_repeat(job: Repeat, per_run: list[object]) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    """Train the federation (or load it from a checkpoint or the cache), then evaluate."""
    return _evaluate(job, _train(job, per_run))


@dataclass
class Trained:
    """One repeat's federation after training, and what evaluating it needs."""

    state: FederationState
    round_times: list[float]
    privacy: list[dict[str, Any]]
    key: str
    cache_hit: bool
    trained_on: dict[str, Any] | None  # a cached federation's host, where it is not this one
    not_stored: str | None  # why the trained federation could not be cached, if it could not
    clients: list[ClientData]
    cfg: LocalConfig
    server: Any
    adversaries: list[int]
    threat: Any
    warnings: list[str]
    attacks_bar: Any


def _train(job: Repeat, per_run: list[object]) -> Trained:
    scenario, task, host, ds, seed, device = (
        job.scenario, job.task, job.host, job.ds, job.seed, job.device
    )  # fmt: skip
    bars, ckpt, label, cache = job.bars, job.ckpt, job.label, job.cache
    fed = scenario.federation
    clients = make_clients(ds, scenario, host, seed, device)
    model = build_model(scenario, host, ds, seed).to(device)
    cfg = LocalConfig(
        fed.local_epochs, fed.batch_size, fed.lr, fed.momentum, fed.weight_decay, task.data.augment
    )
    policy = UpdatePolicy(fed.max_update_norm, fed.on_excess_norm)
    agg = scenario.aggregator
    aggregator = host.registry.build("aggregators", agg.name, agg.params)
    # the server's root set (FLTrust): the examples make_clients kept from every client
    server = make_server(ds, scenario, aggregator, seed, device, model, cfg)
    adversaries = adversaries_of(scenario, seed)
    threat = build_threat(scenario, host, seed)
    warnings = threat_warnings(scenario, threat) if threat is not None else []
    for w in warnings:
        job.warn(w)

    key = training_key(
        scenario, task, seed, device, data=job.data_fp, code=job.code_fp,
        training_defences=training_defences(scenario, host), threat=threat_key(scenario),
        root_set=server.spec.key() if server is not None else None,
    )  # fmt: skip
    numel = sum(p.numel() for p in model.parameters())
    saved = _load_checkpoint(job, numel)
    cached = _load_cached(job, key, numel) if saved is None and job.use_cache else None
    here, trained_on = float_path(device), None
    if cached is not None:
        state = FederationState(
            fed.rounds,
            cached["global"].to(device),
            {c: w.to(device) for c, w in cached["clients"].items()},
            cached["history"],
        )
        round_times = cached["round_s"]
        log.info("%s seed %d: trained federation from the cache (%s)", task.name, seed, key)
        if (trained_on := cached.get("host")) == here:
            trained_on = None
        else:  # the same computation on another float path: used, and said so
            job.warn(
                f"{label}: the cached federation was trained on another host "
                f"({', '.join(differences([trained_on or {}, here]))} differ); "
                "--no-cache retrains it here"
            )
    elif saved is None:
        init = get_weights(model)
        state = FederationState(0, init, {c: init.clone() for c in range(fed.clients)})
        round_times: list[float] = []
    else:
        state = FederationState(
            saved["round"],
            saved["global"].to(device),
            {c: w.to(device) for c, w in saved["clients"].items()},
            saved["history"],
        )
        round_times = saved["round_s"]
        load_plugin_states(per_run, saved["plugins"])
        load_plugin_states([aggregator], [saved.get("aggregator")])
        log.info("%s seed %d: resumed after round %d", task.name, seed, state.round)

    rounds_bar = bars.add(f"{label} rounds", fed.rounds)
    clients_bar = bars.add(f"{label} clients", fed.m)
    attacks_bar = bars.add(f"{label} attacks", len(scenario.attacks) * len(adversaries))
    bars.reset(rounds_bar, fed.rounds, state.round)

    if state.round < fed.rounds:
        setup = TrainingSetup(
            scenario, task, seed, device, job.data_root, host, model, clients, cfg,
            aggregator, policy, per_run, threat, server,
        )  # fmt: skip
        step = job.engine.round_step(setup)
    while state.round < fed.rounds:
        t0 = time.perf_counter()
        bars.reset(clients_bar, fed.m)
        state = step(state, lambda _: bars.advance(clients_bar))
        if scenario.report.save_round_weights:
            _save_round_weights(job, state)
        round_times.append(time.perf_counter() - t0)
        rec = state.history[-1]
        for ev in rec["events"]:
            log.warning("%s seed %d round %d: %s", task.name, seed, rec["round"], ev)
        log.info(
            "%s seed %d round %d: loss %s (%.2f s)",
            task.name, seed, rec["round"], rec["train_loss"], round_times[-1],
        )  # fmt: skip
        ckpt.save_training(
            task.name,
            seed,
            {
                "round": state.round,
                "global": state.global_weights.cpu(),
                "clients": {c: w.cpu() for c, w in state.client_weights.items()},
                "history": state.history,
                "round_s": round_times,
                "plugins": plugin_states(per_run),
                "aggregator": plugin_states([aggregator])[0],
            },
        )
        bars.advance(rounds_bar)
    not_stored = None
    if cached is not None:
        privacy = cached["privacy"]
    else:
        privacy = [p for p in host.hook.testbed_privacy_spent() if p]
        for record in privacy:
            if problem := record_problem(record):
                raise PluginError(
                    f"plugin {implementers_text(host.hook, 'testbed_privacy_spent')}: a "
                    f"privacy record {problem}; a figure must say at what level, against "
                    "whom and under which sampling it holds"
                )
        check_code_unchanged(host, job.code_fp, "before caching the federation")
        not_stored = cache.save(
            key,
            {
                "global": state.global_weights.cpu(),
                "clients": {c: w.cpu() for c, w in state.client_weights.items()},
                "history": state.history,
                "round_s": round_times,
                "privacy": privacy,
                "host": here,
            },
        )
        if not_stored is not None:
            job.warn(f"{label}: the trained federation could not be cached ({not_stored})")
    return Trained(
        state, round_times, privacy, key, cached is not None, trained_on, not_stored, clients,
        cfg, server, adversaries, threat, warnings, attacks_bar,
    )  # fmt: skip


def _evaluate(job: Repeat, t: Trained) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    """Clean accuracy, the attacks (checkpointed one by one), the outsider and the
    poisoning metrics of a trained federation: the repeat's metrics and final models."""
    scenario, task, host, ds, seed, device = (
        job.scenario, job.task, job.host, job.ds, job.seed, job.device
    )  # fmt: skip
    fed, ckpt, bars = scenario.federation, job.ckpt, job.bars
    state, clients, adversaries, threat = t.state, t.clients, t.adversaries, t.threat
    finals = []
    for cid in range(fed.clients):
        m = build_model(scenario, host, ds, seed).to(device)
        set_weights(m, state.client_weights[cid])
        finals.append(m)
    deployed = deploy(finals)
    acc, balanced, diverged = clean_accuracy(deployed, clients, host.hook, seed)
    attacks: dict[str, Any] = ckpt.load_json(task.name, seed, "attacks") or {}
    bars.reset(t.attacks_bar, len(scenario.attacks) * len(adversaries), 0)
    for spec in scenario.attacks:
        if spec.label not in attacks:
            attacks[spec.label], example = run_attack(
                spec, deployed, clients, adversaries, host.registry, host.hook,
                seed=seed, samples=scenario.threat_model.samples_per_adversary,
                num_classes=len(ds.classes), device=device,
                on_adversary_done=lambda: bars.advance(t.attacks_bar), classes=ds.classes,
                keep=scenario.explain.images if scenario.explain else 0,
            )  # fmt: skip
            job.examples_dir.mkdir(parents=True, exist_ok=True)
            if (batch := example.pop("batch", None)) is not None:  # [explain] (explain.py)
                attacks[spec.label]["explain"], fig = explain_for_run(
                    scenario.explain, finals, adversaries[0], batch
                )
                name = f"seed{seed}_{safe_name(spec.label)}_explain.pt"
                torch_save_atomic(fig, job.examples_dir / name)
            torch_save_atomic(example, job.examples_dir / f"seed{seed}_{safe_name(spec.label)}.pt")
            ckpt.save_json(task.name, seed, "attacks", attacks)
        else:
            for _ in adversaries:
                bars.advance(t.attacks_bar)
    outsider = None
    if scenario.outsider is not None:  # crafted on surrogates trained on own data only
        outsider = run_outsider(
            scenario.attacks, deployed, clients, adversaries,
            lambda: build_model(scenario, host, ds, derive_seed(seed, "outsider")),
            t.cfg, scenario.outsider.epochs, host.registry, host.hook,
            seed=seed, samples=scenario.threat_model.samples_per_adversary,
            num_classes=len(ds.classes), device=device, classes=ds.classes,
            done=ckpt.load_json(task.name, seed, "outsider"),
            on_attack_done=lambda r: ckpt.save_json(task.name, seed, "outsider", r),
        )  # fmt: skip
    events = [{"round": r["round"], **e} for r in state.history for e in r["events"]] + diverged
    if threat is not None:
        poisoning = poisoning_metrics(
            threat, deployed, clients, host.hook, seed=seed, num_classes=len(ds.classes),
            acc=acc, history=state.history, warnings=t.warnings,
        )  # fmt: skip
    metrics = {
        "seed": seed,
        "cache": {"key": t.key, "hit": t.cache_hit}
        | ({"trained_on": t.trained_on} if t.trained_on else {})
        | ({"not_stored": t.not_stored} if t.not_stored else {}),
        "clients": [
            {
                "id": c.client_id,
                "train": c.n_train,
                "test": int(c.y_test.shape[0]),
                "train_label_counts": torch.bincount(
                    c.y_train.cpu(), minlength=len(ds.classes)
                ).tolist(),
                "test_label_counts": torch.bincount(
                    c.y_test.cpu(), minlength=len(ds.classes)
                ).tolist(),
            }
            for c in clients
        ],
        "acc": acc,
        "acc_mean": sum(acc.values()) / len(acc),
        "acc_balanced": balanced,
        "acc_balanced_mean": sum(balanced.values()) / len(balanced),
        "client_models": client_model_spread(
            [state.client_weights[cid] for cid in range(fed.clients)]
        ),
        "attacks": {spec.label: attacks[spec.label] for spec in scenario.attacks},
        # robust accuracy over the attacks and Carlini et al.'s sanity checks
        "robustness": evaluate_repeat(
            {spec.label: attacks[spec.label] for spec in scenario.attacks}
        ),
        "privacy": t.privacy,
        "events": events,
        "rounds": state.history,
        "timing": {"round_s": t.round_times, "train_s": sum(t.round_times)},
    }
    if threat is not None:
        metrics["poisoning"] = poisoning
    if t.server is not None:
        metrics["server"] = {"root_set": t.server.info()}
    if outsider is not None:
        metrics["outsider"] = outsider
    return metrics, finals


def _save_round_weights(job: Repeat, state: FederationState) -> None:
    """The global model after each round (report.save_round_weights), for trajectory
    analysis and the engines' equivalence test."""
    wdir = job.ckpt.root.parent / "weights" / safe_name(job.task.name)
    wdir.mkdir(parents=True, exist_ok=True)
    torch_save_atomic(
        state.global_weights.cpu(), wdir / f"seed{job.seed}_round{state.round}_global.pt"
    )
