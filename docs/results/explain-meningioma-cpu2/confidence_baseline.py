# usage: python confidence_baseline.py RUN_DIR DATA_ROOT
"""Baseline for a finished meningioma_reduced run: the same detector on the model's
confidence (max softmax, logit margin) instead of attributions, same 64 images of
adversary 0, same folds."""

import sys
from pathlib import Path

import numpy as np
import torch

from testbed.assemble import build_model, make_clients, per_run_objects
from testbed.explain import detector_auroc
from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario
from testbed.transfer import deploy, run_attack

run = Path(sys.argv[-2])  # the run folder (saved weights needed: --set report.save_weights=true)
host = build_host(autoload=False)
sc = load_scenario(run / "scenario.json", host.registry)
ds = host.registry.build("datasets", sc.data.name, sc.data.params, data_root=Path(sys.argv[-1]))
dev = torch.device("cpu")
with host.active(per_run_objects(sc, host)):
    clients = make_clients(ds, sc, host, 0, dev)
    finals = []
    for c in range(3):
        m = build_model(sc, host, ds, 0)
        m.load_state_dict(
            torch.load(run / f"weights/brain_mri/seed0_client{c}.pt", weights_only=True)
        )
        finals.append(m)
    deployed = deploy(finals)
    for spec in sc.attacks:
        _, ex = run_attack(
            spec,
            deployed,
            clients,
            [0],
            host.registry,
            host.hook,
            seed=0,
            samples=100,
            num_classes=2,
            device=dev,
            classes=ds.classes,
            keep=64,
        )
        b = ex["batch"]
        for role, cid in (("own", 0), ("benign", 1)):
            with torch.no_grad():
                z = torch.cat([finals[cid](b["x"]), finals[cid](b["x_adv"])])
            p = torch.softmax(z, 1)
            feats = np.stack(
                [p.max(1).values.numpy(), (z.max(1).values - z.min(1).values).numpy()], 1
            )
            n = 64
            au = detector_auroc(
                feats, np.r_[np.zeros(n), np.ones(n)], np.r_[np.arange(n), np.arange(n)], 5
            )
            print(spec.label, role, round(au, 3), flush=True)
