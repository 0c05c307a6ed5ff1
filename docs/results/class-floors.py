"""Each client's clean ACC beside the floor of its own test split: the share of its
commonest class, what always answering that class scores (RESULTS.md, "Clean accuracy
against each client's class floor"). Runs recorded before metrics.json kept each client's
test images per class: the partition is recomputed from the scenario and the seed, and its
test split sizes are checked against the record.

    python docs/results/class-floors.py scenarios/paper_baseline.toml DATA_ROOT \
        docs/results/paper_baseline-full-h200/{meningioma,glioma,pathology}-seed*.json

A run made with ``--set`` overrides that change the partition (the sensitivity study's
chunks-N runs) is checked with the same ``--set``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from testbed.assemble import split_train_test
from testbed.pluginmanager import build_host
from testbed.report_floors import at_class_floor, class_floor
from testbed.runner import load_task_data
from testbed.scenario_load import load_scenario
from testbed.state import generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", type=Path)
    ap.add_argument("data_root", type=Path)
    ap.add_argument("metrics", type=Path, nargs="+")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    host = build_host()
    sc = load_scenario(args.scenario, host.registry, args.overrides)
    tasks, data = {t.name: t for t in sc.task_list()}, {}
    print("| run | task | seed | client: ACC / floor (test images of its commonest class) |")
    print("|---|---|---|---|")
    hits = total = 0
    for path in args.metrics:
        for name, task in json.loads(path.read_text())["tasks"].items():
            if name not in data:
                data[name] = load_task_data(sc, tasks[name], host, args.data_root)[0]
            ds = data[name]
            partition = host.registry.build("partitioners", sc.partition.name, sc.partition.params)
            for r in task["repeats"]:
                seed = r["seed"]
                parts = partition(ds.y, sc.federation.clients, generator(seed, "partition"))
                cells = []
                for cid, idx in enumerate(parts):
                    g = generator(seed, "split", cid)
                    _, te = split_train_test(idx, ds.y, sc.partition.train_fraction, g)
                    if len(te) != r["clients"][cid]["test"]:
                        raise SystemExit(f"{path}: client {cid}'s split is not this partition's")
                    counts = torch.bincount(ds.y[te], minlength=len(ds.classes)).tolist()
                    floor, acc = class_floor(counts), r["acc"][str(cid)]
                    at = at_class_floor(acc, counts)  # the rule the reports apply
                    hits, total = hits + at, total + 1
                    cells.append(
                        f"{cid}: {100 * acc:.1f} / {100 * floor:.1f} "
                        f"({max(counts)} of {len(te)}){' **at floor**' if at else ''}"
                    )
                run = path.name if path.name != "metrics.json" else str(path.parent)
                run = run.removeprefix("docs/results/")
                print(f"| {run} | {name} | {seed} | {'; '.join(cells)} |")
    print(f"\n{hits} of {total} client models score no higher than their class floor")


if __name__ == "__main__":
    main()
