"""Training-time attacks through the engine: the threat model a scenario states, data
poisoning of only the compromised clients, aggregator state that resumes, whole poisoned
runs. What each model-poisoning attack does to one round: test_model_poisoning_round.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cli import strip_timing

from testbed import compare
from testbed.builtins.screening_aggregators import CentredClipping, FoolsGold
from testbed.cache import training_key
from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.poisoning_run import build_threat, threat_key, threat_warnings
from testbed.problems import ScenarioError
from testbed.runner import RunError, make_clients
from testbed.scenario_load import load_scenario
from testbed.state import RoundContext
from testbed.threat import malicious_clients

BASE = """
[scenario]
name = "p"
seed = 3
[data]
name = "synthetic"
params = { n_samples = 120, image_size = 16 }
[partition]
name = "iid"
[model]
params = { conv_channels = [4, 4, 8, 8, 8, 8], fc_units = [16, 16, 16, 8] }
[federation]
clients = 5
rounds = 3
local_epochs = 1
device = "cpu"
[report]
plots = false
save_weights = false
"""


@pytest.fixture(scope="module")
def host():
    return build_host(autoload=False)


def scenario(tmp_path: Path, text: str, host):
    p = tmp_path / "s.toml"
    p.write_text(BASE + text)
    return load_scenario(p, host.registry)


def problems(tmp_path: Path, text: str, host) -> list[str]:
    with pytest.raises(ScenarioError) as exc:
        scenario(tmp_path, text, host)
    return [str(p) for p in exc.value.problems]


# -- the threat model ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[threat_model]\nmalicious = [1, 5]\n", "threat_model.malicious [5] out of range 0..4"),
        (
            "[threat_model]\nmalicious = [0, 1, 2, 3, 4, 0]\n",
            "names 6 compromised clients, more than the 5 clients",
        ),
        ("[threat_model]\nmalicious = [1, 1]\n", "names a client twice"),
        (
            "[threat_model]\nmalicious = [1]\nmalicious_fraction = 0.2\n",
            "give malicious or malicious_fraction, not both",
        ),
        ("[threat_model]\nmalicious_fraction = 0.05\n", "gives round(f * N) = 0 compromised"),
        ('[[poisoning]]\nname = "sign_flip"\n', "[[poisoning]] needs threat_model.malicious"),
        (
            '[threat_model]\nmalicious_fraction = 0.95\n[[poisoning]]\nname = "sign_flip"\n',
            "[[poisoning]] with all 5 clients compromised leaves no benign client",
        ),
        (
            '[threat_model]\nmalicious = [0, 1, 2, 3, 4]\n[[poisoning]]\nname = "gaussian"\n',
            "[[poisoning]] with all 5 clients compromised leaves no benign client",
        ),
        (
            '[threat_model]\nmalicious = [1]\n[[poisoning]]\nname = "alie"\n',
            "alie reads the round's benign updates: it needs threat_model.collude = true",
        ),
        (
            '[threat_model]\nadversaries = "malicious"\n',
            "threat_model.adversaries = 'malicious' needs threat_model.malicious",
        ),
    ],
)
def test_bad_threat_models_are_refused(tmp_path, host, text, expect):
    msgs = problems(tmp_path, text, host)
    assert any(expect in m for m in msgs), msgs


def test_fraction_draws_round_f_n_clients_per_seed(tmp_path, host):
    s = scenario(tmp_path, "[threat_model]\nmalicious_fraction = 0.4\n", host)
    draws = {seed: malicious_clients(s.threat_model, 5, seed) for seed in range(6)}
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws.values())
    assert draws[0] == malicious_clients(s.threat_model, 5, 0)  # reproducible
    assert len(set(draws.values())) > 1  # but not the same set for every seed


def test_malicious_clients_are_the_evasion_adversaries(tmp_path, host):
    s = scenario(
        tmp_path,
        '[threat_model]\nmalicious = [2, 4]\nadversaries = "malicious"\n'
        '[[poisoning]]\nname = "sign_flip"\n',
        host,
    )
    assert malicious_clients(s.threat_model, 5, 3) == (2, 4)


def test_cache_key_changes_only_with_poisoning(tmp_path, host):
    plain = scenario(tmp_path, "", host)
    evasion_only = scenario(tmp_path, "[threat_model]\nmalicious = [1]\n", host)
    flip = '[[poisoning]]\nname = "sign_flip"\n'
    poisoned = scenario(tmp_path, "[threat_model]\nmalicious = [1]\n" + flip, host)
    other = scenario(tmp_path, "[threat_model]\nmalicious = [2]\n" + flip, host)

    def key(s) -> str:
        task = s.task_list()[0]
        return training_key(
            s, task, 3, torch.device("cpu"), data="d", code={}, training_defences=[],
            threat=threat_key(s),
        )  # fmt: skip

    assert threat_key(plain) is None and threat_key(evasion_only) is None
    assert key(plain) == key(evasion_only)
    assert key(plain) == training_key(
        plain, plain.task_list()[0], 3, torch.device("cpu"), data="d", code={},
        training_defences=[],
    )  # fmt: skip
    assert len({key(plain), key(poisoned), key(other)}) == 3


# -- data poisoning through make_clients -----------------------------------------------


def clients_of(tmp_path, host, text):
    s = scenario(tmp_path, text, host)
    task = s.task_list()[0]
    ds = host.registry.build("datasets", task.data.name, task.data.params, data_root=None)
    honest = scenario(tmp_path, "", host)
    return (
        make_clients(ds, s, host, 3, torch.device("cpu")),
        make_clients(ds, honest, host, 3, torch.device("cpu")),
    )


def test_label_flip_flips_only_the_compromised_clients_labels(tmp_path, host):
    poisoned, honest = clients_of(
        tmp_path, host, '[threat_model]\nmalicious = [1, 3]\n[[poisoning]]\nname = "label_flip"\n'
    )
    for p, h in zip(poisoned, honest, strict=True):
        want = 1 - h.y_train if p.client_id in (1, 3) else h.y_train  # two classes: swapped
        assert torch.equal(p.y_train, want)
        assert torch.equal(p.x_train, h.x_train) and torch.equal(p.y_test, h.y_test)


def test_backdoor_triggers_a_share_of_the_compromised_clients_images(tmp_path, host):
    poisoned, honest = clients_of(
        tmp_path,
        host,
        '[threat_model]\nmalicious = [2]\n[[poisoning]]\nname = "backdoor"\n'
        "params = { rate = 0.5, target = 1 }\n",
    )
    changed = (poisoned[2].x_train != honest[2].x_train).flatten(1).any(1)
    assert int(changed.sum()) == int(0.5 * honest[2].n_train)
    assert bool((poisoned[2].y_train[changed] == 1).all())
    for c in (0, 1, 3, 4):
        assert torch.equal(poisoned[c].x_train, honest[c].x_train)


def test_clean_label_backdoor_keeps_every_label_and_touches_only_the_target_class(tmp_path, host):
    text = (
        '[threat_model]\nmalicious = [2]\n[[poisoning]]\nname = "clean_label_backdoor"\n'
        "params = { rate = 0.5, target = 1, proxy_epochs = 1, max_iter = 3 }\n"
    )
    poisoned, honest = clients_of(tmp_path, host, text)
    again, _ = clients_of(tmp_path, host, text)
    assert torch.equal(poisoned[2].y_train, honest[2].y_train)
    changed = (poisoned[2].x_train != honest[2].x_train).flatten(1).any(1)
    assert changed.any() and bool((honest[2].y_train[changed] == 1).all())
    assert torch.equal(poisoned[2].x_train, again[2].x_train)  # seeded: proxy and draw
    for c in (0, 1, 3, 4):
        assert torch.equal(poisoned[c].x_train, honest[c].x_train)


def test_target_class_the_task_lacks_is_a_run_error(tmp_path, host):
    with pytest.raises(RunError, match=r"poisoning\[0\] 'backdoor': target class 7 does not"):
        clients_of(
            tmp_path,
            host,
            '[threat_model]\nmalicious = [2]\n[[poisoning]]\nname = "backdoor"\n'
            "params = { target = 7 }\n",
        )


def test_no_poisoning_builds_no_threat(tmp_path, host):
    assert (
        build_threat(scenario(tmp_path, "[threat_model]\nmalicious = [1]\n", host), host, 0) is None
    )


# -- stateful aggregators --------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: centred_clipping(), lambda: foolsgold()], ids=["centred", "foolsgold"]
)
def test_stateful_aggregator_state_round_trips_exactly(make, tmp_path):
    ups = [torch.randn(4, 6, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    ctx = RoundContext(0, 1, 3, 4, (0, 1, 2, 3), {c: 0.25 for c in range(4)})
    straight = make()
    want = [straight.aggregate(u, torch.ones(4), ctx, [0, 1, 2, 3]).delta for u in ups]
    first = make()
    first.aggregate(ups[0], torch.ones(4), ctx, [0, 1, 2, 3])
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    got = [resumed.aggregate(u, torch.ones(4), ctx, [0, 1, 2, 3]).delta for u in ups[1:]]
    assert all(torch.equal(a, b) for a, b in zip(want[1:], got, strict=True))
    fresh = make()
    fresh.aggregate(ups[1], torch.ones(4), ctx, [0, 1, 2, 3])
    # without the state the second round differs: the test can see a lost state
    assert not torch.equal(fresh.aggregate(ups[2], torch.ones(4), ctx, [0, 1, 2, 3]).delta, want[2])


def centred_clipping() -> CentredClipping:
    from testbed.builtins.screening_aggregators import CentredClippingParams

    return CentredClipping(CentredClippingParams(tau=0.5))


def foolsgold() -> FoolsGold:
    from testbed.builtins.screening_aggregators import FoolsGoldParams

    return FoolsGold(FoolsGoldParams())


# -- end to end ------------------------------------------------------------------------

E2E = """
[aggregator]
name = "foolsgold"
[threat_model]
malicious = [1, 4]
collude = true
samples_per_adversary = 5
[[poisoning]]
name = "backdoor"
params = { rate = 0.5, target = 1 }
[[poisoning]]
name = "alie"
[[attacks]]
name = "fgsm"
params = { eps = 0.05 }
"""


def test_poisoned_run_reports_backdoor_detection_and_resumes_exactly(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text(BASE + E2E)
    ref = tmp_path / "ref"
    assert main(["run", str(path), "--out", str(ref), "--no-progress", "--no-cache"]) == 0
    metrics = json.loads((ref / "metrics.json").read_text())
    rep = metrics["tasks"]["synthetic"]["repeats"][0]
    p = rep["poisoning"]
    assert p["malicious"] == [1, 4] and p["attacks"] == ["backdoor", "alie"]
    assert set(p["backdoor_success"]["per_client"]) == {"0", "1", "2", "3", "4"}
    # ALIE's identical uploads look like sybils to FoolsGold: weight zero every round
    assert p["detection"] == {
        "malicious_dropped": 6,
        "malicious": 6,
        "benign_dropped": 0,
        "benign": 9,
    }
    assert all(r["detection"]["malicious_dropped"] == 2 for r in rep["rounds"])
    assert "training-time attacks (backdoor, alie)" in (ref / "report.md").read_text()
    labels, rows = compare.rows({"p": metrics})
    table = compare.markdown(labels, rows)
    assert (
        "| backdoor success | bd untriggered | targeted error | compr. dropped | benign dropped |"
        in table
    )
    assert "| 6/6 | 0/9 |" in table

    # Interrupt after round 2's checkpoint; FoolsGold's history must come back on resume.
    real = FoolsGold.aggregate
    calls = {"n": 0}

    def interrupt_in_round_3(self, updates, sizes, ctx, clients):
        calls["n"] += 1
        if ctx.round == 3 and calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, updates, sizes, ctx, clients)

    monkeypatch.setattr(FoolsGold, "aggregate", interrupt_in_round_3)
    out = tmp_path / "cut"
    assert main(["run", str(path), "--out", str(out), "--no-progress", "--no-cache"]) == 2
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert strip_timing(got) == strip_timing(metrics)


def test_krum_f_below_the_compromised_count_is_a_warning_not_an_error(tmp_path, host):
    s = scenario(
        tmp_path,
        '[aggregator]\nname = "krum"\nparams = { f = 1 }\n'
        '[threat_model]\nmalicious = [1, 2]\n[[poisoning]]\nname = "sign_flip"\n',
        host,
    )
    (warning,) = threat_warnings(s, build_threat(s, host, 3))
    assert "krum tolerates f = 1" in warning and "2 clients are compromised" in warning
    enough = scenario(
        tmp_path,
        '[aggregator]\nname = "krum"\nparams = { f = 1 }\n'
        '[threat_model]\nmalicious = [2]\n[[poisoning]]\nname = "sign_flip"\n',
        host,
    )
    assert threat_warnings(enough, build_threat(enough, host, 3)) == []


def test_scaled_replacement_start_round_past_the_last_round_is_refused(tmp_path, host):
    msgs = problems(
        tmp_path,
        '[threat_model]\nmalicious = [1]\n[[poisoning]]\nname = "scaled_replacement"\n'
        "params = { start_round = 4 }\n",
        host,
    )
    assert any("start_round 4 > 3 rounds: it never acts" in m for m in msgs), msgs


class _Corner(torch.nn.Module):
    """Class 0 (the target) wins where the top-left pixel, the trigger, is lit or where the
    bottom-right one is (a feature some clean images have); ``always`` fixes the class."""

    def __init__(self, always: int | None = None) -> None:
        super().__init__()
        self.always = always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = 10 * x[:, 0, 0, 0] + 5 * x[:, 0, 3, 3]
        if self.always is not None:
            zero = torch.full_like(zero, 10.0 if self.always == 0 else -10.0)
        return torch.stack([zero, torch.full_like(zero, 3.0)], 1)


class _LightCorner:
    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = x.clone()
        x[:, 0, 0, 0] = 255
        return x, 0


class _Diverged(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2), float("nan"))


def _scored(
    models: list[torch.nn.Module], only_target: tuple[int, ...] = (), acc: dict | None = None
) -> dict:
    """Client c's test images: 4 of class 1 (one with the bottom-right pixel lit) and 1 of
    class 0; only class-0 images for the clients in ``only_target``. Client 1 is compromised."""
    from testbed.local_training import ClientData
    from testbed.poisoning_run import Threat, poisoning_metrics
    from testbed.transfer import deploy

    x = torch.zeros(5, 1, 4, 4, dtype=torch.uint8)
    x[0, 0, 3, 3] = 255  # one class-1 image the model calls class 0 without the trigger
    y = torch.tensor([1, 1, 1, 1, 0])  # the class-0 image proves nothing and is left out
    clients = [
        ClientData(c, x, y, x, torch.zeros_like(y) if c in only_target else y)
        for c in range(len(models))
    ]
    threat = Threat(malicious=(1,), collude=False, attacks=[("corner", _LightCorner())])
    acc = acc or {str(c): 0.8 for c in range(len(models))}
    return poisoning_metrics(
        threat, deploy(models), clients, build_host(autoload=False).hook, seed=0,
        num_classes=2, acc=acc, history=[], warnings=[],
    )  # fmt: skip


def test_backdoor_success_beside_the_same_images_without_the_trigger():
    # By hand: client 0 calls all 4 triggered class-1 images class 0 (4/4) and 1 of them
    # untriggered (1/4); client 1 (compromised) always says class 1: 0/4 and 0/4.
    bd = _scored([_Corner(), _Corner(always=1)])["backdoor_success"]
    assert (bd["benign"], bd["malicious"], bd["target"]) == (1.0, 0.0, 0)
    assert bd["untriggered"] == {"per_client": {"0": 0.25, "1": 0.0}, "benign": 0.25,
                                 "malicious": 0.0}  # fmt: skip


def test_a_model_that_calls_everything_the_target_shows_no_backdoor_lift():
    p = _scored([_Corner(always=0), _Corner(always=1)])
    bd = p["backdoor_success"]
    assert bd["benign"] == bd["untriggered"]["benign"] == 1.0  # 4/4 either way
    assert p["warnings"] == [
        "the trigger adds nothing: backdoor success on benign models (100.0%) is no higher "
        "than their rate of class 0 on the same images without it (100.0%)"
    ]
    assert _scored([_Corner(), _Corner(always=1)])["warnings"] == []  # 100% over 25%


def test_a_diverged_benign_model_makes_the_benign_rates_na_not_a_mean_of_the_rest():
    # clean accuracy as clean_accuracy gives it: NaN for the diverged client
    p = _scored(
        [_Corner(), _Corner(always=1), _Diverged()], acc={"0": 0.8, "1": 0.2, "2": math.nan}
    )
    assert math.isnan(p["acc_benign"])  # not client 0's 0.8 alone
    bd = p["backdoor_success"]
    assert bd["per_client"]["0"] == 1.0 and math.isnan(bd["per_client"]["2"])
    assert math.isnan(bd["benign"]) and math.isnan(bd["untriggered"]["benign"])
    assert bd["malicious"] == 0.0 and p["warnings"] == []
    assert _scored([_Corner(), _Corner(always=1), _Corner()])["acc_benign"] == 0.8


def test_a_client_without_images_of_other_classes_is_left_out_not_counted():
    # client 2 holds class-0 (target) images only: no rate, and the benign mean is client 0's
    bd = _scored([_Corner(), _Corner(always=1), _Corner(always=0)], only_target=(2,))[
        "backdoor_success"
    ]
    assert set(bd["per_client"]) == {"0", "1"}
    assert bd["benign"] == 1.0 and bd["untriggered"]["benign"] == 0.25
