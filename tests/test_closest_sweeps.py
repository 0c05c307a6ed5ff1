"""scripts/closest_sweeps.py scales every eps and alpha of a scenario, sweeps included, by
the task's pixel std, and leaves everything else (steps, batch sizes) as it was."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "closest_sweeps", REPO / "scripts" / "closest_sweeps.py"
)
closest_sweeps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(closest_sweeps)


def test_eps_and_alpha_scaled_steps_left_alone():
    scenario = {
        "attacks": [
            {"params": {"eps": 0.03, "batch_size": 100}, "sweep": {"eps": [0.01, 0.1]}},
            {"params": {"eps": 0.03, "eps_step": 0.007}, "sweep": {"max_iter": [5, 40]}},
        ]
    }
    # by hand: 0.03 x 0.2 = 0.006, 0.01 x 0.2 = 0.002, 0.1 x 0.2 = 0.02, 0.007 x 0.2 = 0.0014
    assert closest_sweeps.overrides(scenario, 0.2) == [
        "attacks.0.params.eps=0.006",
        "attacks.0.sweep.eps=[0.002, 0.02]",
        "attacks.1.params.eps=0.006",
        "attacks.1.params.eps_step=0.0014",
    ]


def test_paper_sweeps_gives_the_meningioma_command_in_results():
    out = subprocess.run(
        [sys.executable, "scripts/closest_sweeps.py", "meningioma", "0.2148", "1",
         "--data-root", "/d"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    args = shlex.split(out)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    # 0.03 x 0.2148 = 0.006444 and 0.007 x 0.2148 = 0.0015036, rounded to 6 places
    assert "attacks.3.params.eps_step=0.001504" in sets
    assert "attacks.1.sweep.eps=[0.002148, 0.004296, 0.006444, 0.01074, 0.02148]" in sets
    assert "evaluation.seeds=[1]" in sets and "dp.params.noise_multiplier=0.002" in sets
    assert args[:5] == ["testbed", "run", "scenarios/paper_sweeps.toml", "--task", "meningioma"]
    assert args[args.index("--data-root") + 1] == "/d"


def test_attack_sets_are_the_sensitivity_studys_overrides_one_per_line():
    """reproduce_paper.sh reads these with mapfile: `--set` and its value alternate."""
    out = subprocess.run(
        [sys.executable, "scripts/closest_sweeps.py", "meningioma", "0.2148",
         "--scenario", "scenarios/sensitivity_cpu.toml", "--attack-sets"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out[::2] == ["--set"] * 7
    # the four attacks' eps, and the three iterative ones' step (0.007 x 0.2148)
    assert out[1::2] == [
        "attacks.0.params.eps=0.006444",
        *[
            f"attacks.{i}.params.{k}"
            for i in (1, 2, 3)
            for k in ("eps=0.006444", "eps_step=0.001504")
        ],
    ]
