"""`testbed search`: a constrained Optuna study over one attack's params, on the cached
federation (never retrained), resumable from its sqlite study, bad input one line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import REPO
from test_cli import TINY

import testbed.search
from testbed.cache import FederationCache
from testbed.cli import main
from testbed.engines import InProcess
from testbed.perceptibility import perceptibility

SEARCH = """
[search]
attack = "PGD-3"
n_trials = {n}
space = {{ eps = {eps}, eps_step = {eps_step} }}
constraints = {{ linf_max = 0.03, ssim_min = 0.0 }}
"""


EPS = "{ low = 0.001, high = 0.1, step = 0.001 }"
EPS_STEP = '{ low = 0.1, high = 0.5, relative_to = "eps" }'  # a fraction of eps


def write(tmp_path: Path, extra: str, n: int = 6) -> Path:
    p = tmp_path / "s.toml"
    text = TINY.replace("plots = false", f'plots = false\nout_dir = "{tmp_path / "reports"}"')
    p.write_text(text + SEARCH.format(n=n, eps=EPS, eps_step=EPS_STEP) + extra)
    return p


def search(tmp_path: Path, scenario: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "out"
    assert main(["search", str(scenario), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "search.json").read_text())


def test_toy_problem_finds_the_bound(tmp_path, monkeypatch):
    """ASR rising with eps, Linf capped at 0.03: the best feasible eps is the bound. The
    attack is a toy (x + eps, success eps/0.1); the study, constraints and pruning are real."""

    def toy_attack(spec, deployed, clients, adversaries, *a: Any, **k: Any):
        eps = spec.params["eps"]
        x = torch.full((4, 1, 16, 16), 0.5)
        success = eps / 0.1 * (0.9 + 0.1 * adversaries[0] / 3)  # adversaries differ a little
        return {
            "aasr_benign": success,
            "aasr_own": 1.0,
            "perceptibility": perceptibility(x, x + eps),
        }, {}

    monkeypatch.setattr(testbed.search, "run_attack", toy_attack)
    result = search(tmp_path, write(tmp_path, "", n=40))
    assert result["trials"] == 40
    assert 0.029 <= result["best"]["params"]["eps"] <= 0.03 + 1e-9  # within a step
    assert result["best"]["perceptibility"]["linf_max"] <= 0.03 + 1e-6
    entry = tomllib.loads((tmp_path / "out" / "best_attack.toml").read_text())["attacks"][0]
    assert entry["name"] == "pgd" and entry["params"]["eps"] == result["best"]["params"]["eps"]
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000
    study = optuna.load_study(study_name=result["study"], storage=result["storage"])
    # the configured attack (eps 0.05, eps_step 0.01 = 0.2 eps) is the first trial
    assert study.trials[0].params == pytest.approx({"eps": 0.05, "eps_step": 0.2})
    # constrained, not penalised: infeasible trials exist and carry their violation
    assert any(t.constraints.get("linf", 0) > 0 for t in study.trials)


def test_a_bound_no_configuration_meets_is_one_line_exit_2(tmp_path, capsys):
    scenario = write(tmp_path, "", n=2)
    tight = ["--set", "search.constraints.linf_max=0.0005"]  # below the smallest eps, 0.001
    assert main(["search", str(scenario), "--no-progress", *tight]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "no feasible trial in 2" in err[-1], err


def test_reuses_the_cached_federation_and_resumes_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    scenario = write(tmp_path, "", n=3)
    feasible = ("--set", "search.space.eps.high=0.03")  # every trial within the bound
    first = search(tmp_path, scenario, *feasible)
    assert first["cache_hit"] is False and first["trials"] == 3

    def no_training(self, setup):
        raise AssertionError("the search retrained a cached federation")

    monkeypatch.setattr(InProcess, "round_step", no_training)
    # as if the cache folder came from a host with other CPU flags: used, and recorded
    cache = FederationCache(tmp_path / "cache" / "federations")
    [key] = [p.stem for p in cache.root.glob("*.pt")]
    entry = cache.load(key)
    cache.save(key, {**entry, "host": {**entry["host"], "cpu_flags": "0123456789ab"}})
    second = search(tmp_path, scenario, *feasible, "--trials", "5")
    assert second["cache_hit"] is True and "trained_on" not in first
    assert second["trained_on"]["cpu_flags"] == "0123456789ab"
    assert second["trials"] == 5  # the stored study's 3 trials, then 2 more
    assert second["storage"].endswith("search-tiny.db")
    study = optuna.load_study(study_name=second["study"], storage=second["storage"])
    assert len(study.trials) == 5
    best = second["best"]
    assert best["perceptibility"]["linf_max"] <= 0.03 + 1e-6
    assert best["params"]["eps_step"] <= best["params"]["eps"]
    # the same study name on another space would mix two problems: refused
    other = ("--set", "search.space.eps.high=0.02")
    assert main(["search", str(scenario), "--out", str(tmp_path / "o2"), *other]) == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('attack = "PGD-3"', 'attack = "CW"'), "search.attack 'CW' is not an [[attacks]] label"),
        (("space = {", "space = {} #"), "space"),
        (("low = 0.001, high = 0.1", "low = 0.1, high = 0.001"), "must be below high"),
        (("eps = {", "confidence = {"), "relative_to = 'eps' is not a searched param"),
        (("eps_step = {", "confidence = {"), "pgd has no param confidence"),
        (("high = 0.1,", "high = 2.0,"), "search.space.eps = 2.0"),
        (("high = 0.1,", "high = nan,"), "Input should be a finite number"),
        ((EPS_STEP, "{ choices = [0.5] }"), "search.space.eps = 0.001: eps_step (0.5) larger"),
        (("n_trials =", 'storage = "notaurl"\nn_trials ='), "storage 'notaurl': cannot open"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, edit, message):
    scenario = write(tmp_path, "")
    scenario.write_text(scenario.read_text().replace(*edit))
    assert main(["search", str(scenario), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "reports" / "search-tiny").exists()  # no empty folder left behind


def test_a_search_weaker_than_a_configured_attack_says_so(tmp_path, monkeypatch, capsys):
    """The bar is every configured attack within the bound: here an FGSM entry that the
    toy makes stronger (0.9) than any PGD point of the space (at most 0.3) is."""

    def toy_attack(spec, deployed, clients, adversaries, *a: Any, **k: Any):
        eps = spec.params["eps"]
        x = torch.full((4, 1, 16, 16), 0.5)
        success = 0.9 if spec.name == "fgsm" else eps / 0.1
        p = perceptibility(x, x + eps)
        return {"aasr_benign": success, "aasr_own": 1.0, "perceptibility": p}, {}

    monkeypatch.setattr(testbed.search, "run_attack", toy_attack)
    fgsm = '[[attacks]]\nname = "fgsm"\nparams = { eps = 0.02 }\n'
    scenario = write(tmp_path, "", n=3)
    scenario.write_text(scenario.read_text().replace("[report]", fgsm + "[report]"))
    result = search(tmp_path, scenario, "--set", "search.space.eps.high=0.03")
    configured = {r["label"]: r for r in result["configured"]}
    assert configured["FGSM"]["value"] == 0.9 and configured["FGSM"]["feasible"]
    assert configured["PGD-3"]["feasible"] is False  # eps 0.05 breaks the bound 0.03
    assert result["at_least_as_strong"] is False
    assert "FGSM (0.9000) is stronger than the search's best" in capsys.readouterr().err


def test_search_on_the_quickstart_is_at_least_as_strong_as_its_configured_attacks(tmp_path):
    """Issue 13's criterion on the shipped scenario, with a short study (the shipped one
    runs 30 trials): the configured PGD-10 is trial 0 and FGSM is scored on the same
    objective and bound, so the best can only be weaker if the bookkeeping is wrong."""
    out = tmp_path / "out"
    args = ["search", str(REPO / "scenarios" / "quickstart.toml"), "--out", str(out)]
    storage = f'search.storage="sqlite:///{tmp_path / "s.db"}"'
    assert main([*args, "--trials", "3", "--no-progress", "--set", storage]) == 0
    result = json.loads((out / "search.json").read_text())
    configured = {r["label"]: r for r in result["configured"]}
    assert set(configured) == {"FGSM", "PGD-10"}
    assert configured["PGD-10"]["feasible"]  # the bound was set so that it is
    assert result["at_least_as_strong"] is True
    assert result["best"]["value"] >= configured["PGD-10"]["value"]
    p = result["best"]["perceptibility"]
    assert p["ssim_mean"] >= 0.93 and p["linf_max"] <= 0.05 + 1e-6


def test_a_federation_cache_it_cannot_write_is_one_line_before_training(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "a_file"))  # the models go there
    assert main(["search", str(write(tmp_path, "")), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot create the federation cache the search reads its models from" in err
    assert "federation:" not in err  # nothing trained


def test_a_diverged_federation_is_one_line_not_no_feasible_trial(tmp_path, capsys):
    # noise 1e36 x C: finite weights whose outputs overflow; every trial would score NaN
    scenario = write(tmp_path, "")
    args = ["--set", "dp.params.noise_multiplier=1e36", "--set", "search.study_name=diverged"]
    assert main(["search", str(scenario), "--no-progress", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the federation diverged: client 0's model gives non-finite outputs on" in err
    assert "no feasible trial" not in err
    assert not (tmp_path / "reports" / "search-tiny").exists()  # made before training, removed
