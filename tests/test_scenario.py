from pathlib import Path

import pytest
from conftest import REPO
from pydantic import BaseModel, ValidationError

from testbed.builtins.dp import PaperDPParams
from testbed.builtins.dpsgd import DPSGDParams
from testbed.builtins.server_defences import CentralDPParams, NormBoundParams
from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.poisoning import GaussianParams
from testbed.problems import ScenarioError, pydantic_problems
from testbed.scenario_load import load_scenario

SCENARIOS = sorted((REPO / "scenarios").rglob("*.toml"))

MINIMAL = """
[scenario]
name = "t"
[data]
name = "synthetic"
"""


@pytest.fixture(scope="module")
def registry():
    return build_host(autoload=False).registry


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str, registry) -> list[str]:
    with pytest.raises(ScenarioError) as exc:
        load_scenario(write(tmp_path, text), registry)
    return [str(p) for p in exc.value.problems]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path, registry):
    scenario = load_scenario(path, registry)
    assert scenario.scenario.name


def test_minimal_scenario_gets_defaults(tmp_path, registry):
    s = load_scenario(write(tmp_path, MINIMAL), registry)
    assert s.partition.name == "noniid_chunks"
    assert s.aggregator.name == "fedavg"
    assert s.federation.rounds == 50 and s.federation.m == 3
    # component params are resolved with the component's own defaults filled in
    assert s.model.params["dropout"] == 0.25
    assert s.seeds() == [0]


def test_toml_syntax_error_names_file_and_line(tmp_path, registry):
    (msg,) = problems(tmp_path, MINIMAL + "\n[federation\nrounds = 3\n", registry)
    assert "s.toml" in msg and "TOML syntax error" in msg and "line 7" in msg


def test_all_problems_reported_at_once_with_dotted_paths(tmp_path, registry):
    text = (
        MINIMAL
        + """
colour = "blue"
[federation]
clients = 3
sampled = 4
rounds = "ten"
[aggregator]
name = "fedavgg"
[[attacks]]
name = "pgd"
params = { eps = -0.1, eps_step = 0.01, max_iter = 10, bogus = 1 }
"""
    )
    msgs = problems(tmp_path, text, registry)
    joined = "\n".join(msgs)
    assert "colour: unknown key" in joined
    assert "federation.rounds:" in joined
    assert "aggregator.name: unknown aggregator 'fedavgg' (known: " in joined
    assert "fedavg, " in joined
    assert "attacks[0].params.eps:" in joined
    assert "attacks[0].params.bogus: unknown key" in joined
    assert all(m.startswith(str(tmp_path / "s.toml")) for m in msgs)
    assert len(msgs) >= 5


def test_cross_field_rules(tmp_path, registry):
    text = MINIMAL + "[federation]\nclients = 2\nsampled = 3\n"
    (msg,) = problems(tmp_path, text, registry)
    assert "federation" in msg and "sampled (3) must not exceed clients (2)" in msg
    text = MINIMAL + "[threat_model]\nadversaries = [0, 5]\n"
    (msg,) = problems(tmp_path, text, registry)
    assert "out of range" in msg
    # one client or one seed twice would count twice in means and spreads over them
    text = MINIMAL + "[threat_model]\nadversaries = [1, 0, 1]\n"
    (msg,) = problems(tmp_path, text, registry)
    assert "threat_model.adversaries [1, 0, 1] names a client twice" in msg
    text = MINIMAL + "[evaluation]\nseeds = [4, 2, 4]\n"
    (msg,) = problems(tmp_path, text, registry)
    assert "evaluation" in msg and "seeds repeat a seed: [4, 2, 4]" in msg


def test_nan_and_inf_are_refused_in_every_float(tmp_path, registry):
    # TOML has nan and inf literals; an infinite noise multiplier passed every bound and
    # only failed in round 1 as a "plugin broke the download" error
    text = (
        MINIMAL
        + """
[federation]
lr = nan
[dp]
name = "paper_dp"
params = { noise_multiplier = inf }
[[attacks]]
name = "fgsm"
params = { eps = -inf }
"""
    )
    msgs = "\n".join(problems(tmp_path, text, registry))
    for path in ("federation.lr", "dp.params.noise_multiplier", "attacks[0].params.eps"):
        assert f"{path}: Input should be a finite number" in msgs


def test_a_union_gives_one_line_per_place_not_one_per_member():
    class M(BaseModel):
        x: int | float
        y: int
        z: list[int | str]

    with pytest.raises(ValidationError) as exc:
        M(x="a", y="b", z=[1, [2]])
    got = [str(p) for p in pydantic_problems("f.toml", exc.value, "sec")]
    assert got == [
        "f.toml: sec.x: Input should be a valid integer, unable to parse string as an "
        "integer; or a valid number, unable to parse string as a number",
        "f.toml: sec.y: Input should be a valid integer, unable to parse string as an integer",
        "f.toml: sec.z[1]: Input should be a valid integer; or a valid string",
    ]


Z, C = "noise_multiplier", "clip_norm"


@pytest.mark.parametrize(
    ("cls", "kw", "product"),
    [
        (PaperDPParams, {C: 1e10, Z: 1e30}, "noise_multiplier x clip_norm"),
        (CentralDPParams, {C: 1e30, Z: 1e10}, "noise_multiplier x clip_norm"),
        (DPSGDParams, {"max_grad_norm": 1e20, Z: 1e20}, "noise_multiplier x max_grad_norm"),
        (NormBoundParams, {"max_norm": 1.0, "noise_std": 1e38}, "noise_std"),
        (GaussianParams, {"sigma": 1e38}, "sigma"),
    ],
)
def test_a_noise_std_whose_draws_would_overflow_float32_is_refused(cls, kw, product):
    with pytest.raises(ValidationError, match=f"{product} = .* too large for a noise std"):
        cls(**kw)
    # each factor alone is fine, and so is a product a 10-sigma draw keeps in float32
    cls(**{k: min(v, 1e15) for k, v in kw.items()})


def test_duplicate_attack_labels_rejected(tmp_path, registry):
    text = (
        MINIMAL
        + """
[[attacks]]
name = "fgsm"
params = { eps = 0.03 }
[[attacks]]
name = "fgsm"
params = { eps = 0.05 }
"""
    )
    (msg,) = problems(tmp_path, text, registry)
    assert "attack labels must be unique" in msg and "FGSM" in msg


def test_data_or_tasks_required(tmp_path, registry):
    (msg,) = problems(tmp_path, '[scenario]\nname = "t"\n', registry)
    assert "either [data] or [[tasks]]" in msg


def test_validate_cli_exit_codes_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write(tmp_path, MINIMAL)
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "[federation]\nclients = 0\n")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr()
    assert "bad.toml: federation.clients:" in err.out + err.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "s.toml"]


def test_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr()
    assert "file not found" in err.out + err.err


def test_set_overrides_any_value_and_reports_bad_paths(tmp_path, registry):
    from testbed.scenario_load import load_scenario

    text = MINIMAL + '[[attacks]]\nname = "fgsm"\nparams = { eps = 0.03 }\n'
    path = write(tmp_path, text)
    s = load_scenario(
        path, registry, ["federation.rounds=3", "attacks.0.params.eps=0.1", "scenario.name=x"]
    )
    assert s.federation.rounds == 3 and s.attacks[0].params["eps"] == 0.1
    assert s.scenario.name == "x"
    # the place as `testbed validate` names it works too
    s = load_scenario(path, registry, ["attacks[0].params.eps=0.2"])
    assert s.attacks[0].params["eps"] == 0.2
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, registry, ["attacks[0].params.eps=1e400"])  # TOML reads inf
    assert "attacks[0].params.eps: Input should be a finite number" in str(exc.value)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, registry, ["attacks.5.params.eps=0.1"])
    assert "--set attacks.5.params.eps: no such place" in str(exc.value)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, registry, ["federation.rounds=zero"])
    assert "federation.rounds:" in str(exc.value)
