"""Seconds per round on the in-process and the Flower engine, for 3, 10 and 50 clients.

    python benchmarks/engines.py [--clients 3 10 50] [--rounds 4] [--out F.md]

Each point is a real `testbed run` of scenarios/scale50.toml (generated data, 60 images per
client, every client sampled, 1 local epoch) with the federation size and engine set on
the command line, no cache. "first" is round 1 (on Flower it includes starting the Ray
actors and loading the data there); "later" is the median of the other rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from testbed.cli import main as testbed

REPO = Path(__file__).resolve().parents[1]


def time_rounds(clients: int, engine: str, rounds: int, out: Path) -> list[float]:
    argv = [
        "run", str(REPO / "scenarios" / "scale50.toml"), "--out", str(out), "--no-progress",
        "--no-cache", "--engine", engine,
        "--set", f"federation.clients={clients}", "--set", f"federation.sampled={clients}",
        "--set", f"federation.rounds={rounds}", "--set", "federation.local_epochs=1",
        "--set", f"data.params.n_samples={60 * clients}", "--set", "report.plots=false",
        "--set", "report.save_weights=false", "--set", "threat_model.adversaries=[0]",
    ]  # fmt: skip
    if testbed(argv) != 0:
        raise SystemExit(f"run failed: {clients} clients on {engine}")
    metrics = json.loads((out / "metrics.json").read_text())
    (task,) = metrics["tasks"].values()
    return task["repeats"][0]["timing"]["round_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", nargs="+", type=int, default=[3, 10, 50])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [
        "| clients | in-process first | in-process later | Flower first | Flower later | "
        "Flower / in-process (later) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            cells = []
            later = {}
            for engine in ("inprocess", "flower"):
                r = time_rounds(n, engine, args.rounds, Path(tmp) / f"{engine}{n}")
                later[engine] = statistics.median(r[1:]) if len(r) > 1 else r[0]
                cells += [f"{r[0]:.2f} s", f"{later[engine]:.2f} s"]
            ratio = later["flower"] / later["inprocess"]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
