# usage: python reexplain_ig.py STEPS RUN_DIR DATA_ROOT
"""Re-explain a finished meningioma_reduced run's attacks with IG at STEPS steps, from its
saved weights (adversary 0 only; run_attack seeds per (seed, attack, label, adversary), so
its examples are the run's; checked against the run's ASR and saliency statistics)."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from testbed.assemble import build_model, make_clients, per_run_objects
from testbed.explain import explain_for_run
from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario
from testbed.transfer import deploy, run_attack

run = Path(sys.argv[-2])  # the run folder (saved weights needed: --set report.save_weights=true)
steps = int(sys.argv[1])
host = build_host(autoload=False)
sc = load_scenario(run / "scenario.json", host.registry)
ds = host.registry.build("datasets", sc.data.name, sc.data.params, data_root=Path(sys.argv[-1]))
dev = torch.device("cpu")
out = {}
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
    ref = json.loads((run / "metrics.json").read_text())["tasks"]["brain_mri"]["repeats"][0][
        "attacks"
    ]
    for spec in sc.attacks:
        res, ex = run_attack(
            spec,
            deployed,
            clients,
            [0],
            host.registry,
            host.hook,
            seed=0,
            samples=sc.threat_model.samples_per_adversary,
            num_classes=2,
            device=dev,
            classes=ds.classes,
            keep=64,
        )
        assert res["asr"][0] == ref[spec.label]["asr"][0], "not the run's examples"
        cfg = SimpleNamespace(
            methods=["saliency", "integrated_gradients"],
            images=64,
            top_k=0.1,
            ig_steps=steps,
            folds=5,
        )
        t0 = time.time()
        e, _ = explain_for_run(cfg, finals, 0, ex["batch"])
        assert e["per_method"]["saliency"] == ref[spec.label]["explain"]["per_method"]["saliency"]
        out[spec.label] = e
        print(
            spec.label,
            round(time.time() - t0),
            {
                r: (
                    round(s["rank_corr"], 3),
                    round(s["top_k_overlap"], 3),
                    round(s["auroc"], 3),
                    round(s["ig_completeness_gap"], 3),
                )
                for r, s in e["per_method"]["integrated_gradients"].items()
            },
            flush=True,
        )
(run / f"ig{steps}.json").write_text(json.dumps(out))
