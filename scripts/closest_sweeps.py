"""Print the `testbed run` command for paper_sweeps at the sensitivity study's closest setting.

The closest setting (docs/RESULTS.md) reads every eps and alpha of the paper after
normalisation: on [0, 1] pixels they are the paper's value times the task's pixel std.
This scales every eps and eps_step of paper_sweeps.toml, the sweep grids included, so
that no value is copied out of the scenario by hand, and adds the reduced CPU schedule.

    python scripts/closest_sweeps.py glioma 0.194353 0 | sh

The std is the one `scripts/reproduce_paper.sh` prints ("pixel std"); the command is
printed, not run, so that RESULTS can quote exactly what ran. With ``--attack-sets`` it
prints only the attacks' ``--set`` arguments, one per line: reproduce_paper.sh's
sensitivity study reads them, so both scale the values the scenario holds, one way.
"""

from __future__ import annotations

import argparse
import shlex
import tomllib
from pathlib import Path

SCALED = ("eps", "eps_step")


def overrides(scenario: dict, std: float) -> list[str]:
    """`--set` values scaling each attack's eps and eps_step (and their sweeps) by std."""
    sets = []
    for i, attack in enumerate(scenario["attacks"]):
        for key in SCALED:
            if key in attack.get("params", {}):
                sets.append(f"attacks.{i}.params.{key}={round(attack['params'][key] * std, 6)}")
        for key, grid in attack.get("sweep", {}).items():
            if key in SCALED:
                values = ", ".join(str(round(v * std, 6)) for v in grid)
                sets.append(f"attacks.{i}.sweep.{key}=[{values}]")
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("std", type=float, help="the task's pixel std on [0, 1] pixels")
    parser.add_argument("seed", type=int, nargs="?", help="the run's one seed")
    parser.add_argument("--scenario", type=Path, default=Path("scenarios/paper_sweeps.toml"))
    parser.add_argument("--out", help="run folder")
    parser.add_argument("--data-root", default="../shared/datasets", help="the datasets' folder")
    parser.add_argument("--noise", type=float, default=0.002, help="dp noise multiplier z")
    parser.add_argument(
        "--attack-sets", action="store_true", help="print the attacks' --set arguments only"
    )
    args = parser.parse_args()
    scenario = tomllib.loads(args.scenario.read_text())
    if args.attack_sets:
        for value in overrides(scenario, args.std):
            print(f"--set\n{value}")
        return
    if args.seed is None:
        parser.error("the seed is required unless --attack-sets")
    sets = [
        f"dp.params.noise_multiplier={args.noise}",
        "federation.rounds=5",
        "federation.local_epochs=4",
        "evaluation.repeats=1",
        f"evaluation.seeds=[{args.seed}]",
        *overrides(scenario, args.std),
    ]
    command = ["testbed", "run", str(args.scenario), "--task", args.task, "--device", "cpu"]
    command += ["--data-root", args.data_root, "--no-progress"]
    if args.out:
        command += ["--out", args.out]
    for value in sets:
        command += ["--set", value]
    print(shlex.join(command))


if __name__ == "__main__":
    main()
