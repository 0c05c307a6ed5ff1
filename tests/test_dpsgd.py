"""dp_sgd: local DP-SGD with Opacus inside each client's training (testbed/builtins/dpsgd.py)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from conftest import REPO
from opacus.accountants import RDPAccountant
from pydantic import ValidationError
from test_cli import strip_timing
from torch import nn

from testbed import hookimpl
from testbed.builtins.dpsgd import DPSGD, DPSGDParams
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.cli import main
from testbed.local_training import ClientData, LocalConfig, get_weights, seeded, set_weights
from testbed.pluginmanager import build_host
from testbed.scenario import Augment
from testbed.state import RoundContext, derive_seed

N_TRAIN, BATCH = 24, 8  # 3 batches per epoch: sample rate 1/3
CFG = LocalConfig(
    epochs=1,
    batch_size=BATCH,
    lr=0.05,
    momentum=0.9,
    weight_decay=1e-4,
    augment=Augment(hflip=True, rotate_degrees=5),
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's
    threads waiting for each other made these tests 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(conv=(2, 2, 4, 4, 4, 4)) -> nn.Module:
    torch.manual_seed(0)
    p = PaperCNNParams(conv_channels=conv, fc_units=(8, 8, 8, 4))
    return build_paper_cnn(p, 1, 16, 2, [0.5], [0.25])


def data(cid: int = 0, n: int = N_TRAIN) -> ClientData:
    g = torch.Generator().manual_seed(cid)
    x = torch.randint(0, 256, (n + 4, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (n + 4,), generator=g)
    return ClientData(cid, x[:n], y[:n], x[n:], y[n:])


def ctx(rnd: int = 1, rounds: int = 3, n: int = 1, seed: int = 0) -> RoundContext:
    return RoundContext(
        seed=seed,
        round=rnd,
        rounds=rounds,
        n_clients=n,
        sampled=tuple(range(n)),
        weights={i: 1 / n for i in range(n)},
    )


def train(
    mech: DPSGD, model: nn.Module, c: RoundContext, d: ClientData, cfg: LocalConfig = CFG
) -> float:
    """As testbed.local_training.client_step calls the hook."""
    model.train()
    with seeded(derive_seed(c.seed, c.round, "dropout", d.client_id), torch.device("cpu")):
        return mech.testbed_local_training(
            ctx=c, model=model, data=d, cfg=cfg, generator=c.generator("local", d.client_id)
        )


def mech(**kw) -> DPSGD:
    kw.setdefault("max_grad_norm", 1.0)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 1.0)
    return DPSGD(DPSGDParams(**kw))


def run_rounds(m: DPSGD, rounds: int, model: nn.Module | None = None, total: int = 3) -> list:
    model = model or tiny_model()
    records = []
    for r in range(1, rounds + 1):
        c = ctx(r, rounds=total)
        train(m, model, c, data())
        rec: dict = {}
        m.testbed_round_end(ctx=c, record=rec)
        records.append(rec["dp_sgd"])
    return records


def test_params_need_exactly_one_of_noise_multiplier_and_target_epsilon():
    with pytest.raises(ValidationError, match="exactly one"):
        DPSGDParams(max_grad_norm=1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        DPSGDParams(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValidationError):
        DPSGDParams(noise_multiplier=1.0, grad_sample_mode="ew")
    with pytest.raises(ValidationError, match="needs noise"):
        DPSGDParams(noise_multiplier=0.0, budget_epsilon=1.0)
    assert DPSGDParams(target_epsilon=3.0).accountant == "rdp"


def test_same_seed_reproduces_noise_changes_the_result_and_engine_model_stays_plain():
    w0 = get_weights(tiny_model())

    def once(z: float, seed: int = 0) -> torch.Tensor:
        model = tiny_model()
        loss = train(mech(noise_multiplier=z), model, ctx(seed=seed), data())
        assert math.isfinite(loss) and loss > 0
        # the engine's model is trained in place and left without Opacus' wrappers/hooks
        assert type(model).__name__ == "PaperCNN"
        for m in model.modules():
            assert not m._forward_hooks and not m._backward_hooks
            assert not hasattr(m, "activations")
            assert not isinstance(m, nn.ReLU) or m.inplace  # untouched
        assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())
        return get_weights(model)

    a = once(1.0)
    assert torch.equal(a, once(1.0))  # same ctx: identical weights
    assert not torch.equal(a, w0)
    assert not torch.equal(a, once(0.0))  # noise changes the update
    assert not torch.equal(a, once(1.0, seed=1))  # another seed: other samples and noise


@pytest.mark.parametrize("mode", ["functorch", "ghost", "ghost-opacus"])
@pytest.mark.parametrize("z", [0.0, 1.0])
def test_every_mode_clips_and_noises_like_opacus_hooks(mode, z):
    # The update depends only on the clipped per-example gradients and the noise (drawn
    # from the same seeded generator): every mode, and testbed's lean ghost driver, must
    # give Opacus' hooks-mode result. Wider convolutions so that testbed's grouped-
    # convolution per-example gradients are used; 3 images at sample rate 1/3 for 12
    # steps draw empty Poisson batches too (noise-only steps).
    conv = (4, 16, 16, 16, 16, 16)
    tiny_batches = LocalConfig(4, 1, 0.05, 0.9, 0.0, Augment(hflip=True, rotate_degrees=5))

    def once(grad_sample_mode: str, d: ClientData, cfg: LocalConfig) -> torch.Tensor:
        m = mech(noise_multiplier=z, max_grad_norm=0.05, grad_sample_mode=grad_sample_mode)
        m.lean_ghost = mode != "ghost-opacus"
        model = tiny_model(conv)
        train(m, model, ctx(), d, cfg)
        assert m.round_steps[0] == cfg.epochs * math.ceil(d.n_train / cfg.batch_size)
        return get_weights(model)

    for d, cfg in ((data(), CFG), (data(n=3), tiny_batches)):
        ref = once("hooks", d, cfg)
        got = once("ghost" if mode == "ghost-opacus" else mode, d, cfg)
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_update_is_clipped_per_example():
    # One full-batch step (sample rate 1), plain SGD, no noise: the update is
    # -lr * mean of the clipped per-example gradients, so its norm is at most lr * C.
    cfg = LocalConfig(1, N_TRAIN, 1.0, 0.0, 0.0, Augment(hflip=False))
    model = tiny_model()
    w0 = get_weights(model)
    train(mech(noise_multiplier=0.0, max_grad_norm=1e-3), model, ctx(), data(), cfg)
    norm = float((get_weights(model) - w0).norm())
    assert 0 < norm <= 1e-3 * (1 + 1e-5)
    plain = tiny_model()  # unclipped, the same step moves much further
    nn.functional.cross_entropy(plain(data().x_train.float() / 255), data().y_train).backward()
    assert float(torch.cat([p.grad.flatten() for p in plain.parameters()]).norm()) > 0.01


def test_epsilon_grows_over_rounds_and_matches_opacus_rdp_by_hand():
    records = run_rounds(mech(noise_multiplier=1.1, delta=1e-5), 3)
    eps = [r["epsilon"]["0"] for r in records]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert [r["steps"]["0"] for r in records] == [3, 3, 3]
    for k in (1, 3):
        acc = RDPAccountant()
        for _ in range(3 * k):  # 3 batches per epoch, 1 epoch per round
            acc.step(noise_multiplier=1.1, sample_rate=1 / 3)
        assert eps[k - 1] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_budget_epsilon_stops_a_client_with_a_zero_update():
    e = [r["epsilon"]["0"] for r in run_rounds(mech(), 3)]
    m = mech(budget_epsilon=(e[1] + e[2]) / 2)
    model = tiny_model()
    records = run_rounds(m, 2, model)
    before = get_weights(model)
    c = ctx(3)
    assert train(m, model, c, data()) > 0  # the loss of the model it holds
    assert torch.equal(get_weights(model), before)  # zero update
    rec: dict = {}
    m.testbed_round_end(ctx=c, record=rec)
    assert [r["stopped"]["0"] for r in records] == [False, False]
    assert rec["dp_sgd"]["stopped"]["0"] and rec["dp_sgd"]["stopped_this_round"] == [0]
    assert rec["dp_sgd"]["epsilon"]["0"] == pytest.approx(e[1])  # nothing more spent
    spent = m.testbed_privacy_spent()
    assert spent["stopped_clients"] == {"0": 3}
    assert spent["epsilon"] <= m.p.budget_epsilon


def test_target_epsilon_is_reached_over_the_planned_rounds():
    m = mech(target_epsilon=4.0, delta=1e-5)
    run_rounds(m, 3, total=3)
    spent = m.testbed_privacy_spent()
    assert 0.9 * 4.0 <= spent["epsilon"] <= 4.0
    assert spent["noise_multiplier"] == spent["noise_multiplier_per_client"][0] > 0


def test_prv_accountant_is_tighter_than_rdp():
    eps = {}
    for accountant in ("rdp", "prv"):
        m = mech(noise_multiplier=1.0, accountant=accountant)
        run_rounds(m, 2)
        spent = m.testbed_privacy_spent()
        assert spent["accountant"] == accountant
        eps[accountant] = spent["epsilon"]
    assert 0 < eps["prv"] < eps["rdp"]


def test_state_dict_round_trip_continues_the_accounting_identically():
    a = mech(noise_multiplier=1.1, budget_epsilon=50.0)
    model = tiny_model()
    run_rounds(a, 2, model)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = mech(noise_multiplier=1.1, budget_epsilon=50.0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.state_dict() == a.state_dict()
    assert b.epsilon_of(0) == a.epsilon_of(0)
    weights = get_weights(model)
    out = []
    for m in (a, b):
        model = tiny_model()
        set_weights(model, weights)
        train(m, model, ctx(3), data())
        rec: dict = {}
        m.testbed_round_end(ctx=ctx(3), record=rec)
        out.append((get_weights(model), rec["dp_sgd"], m.testbed_privacy_spent()))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1:] == out[1][1:]


def test_batchnorm_model_is_rejected():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(392, 2))
    with pytest.raises(ValueError, match="BatchNorm"):
        train(mech(), model, ctx(), data())


SHRINK = [
    "data.params.n_samples=90",
    "data.params.image_size=16",
    "model.params.conv_channels=[4, 4, 8, 8, 8, 8]",
    "model.params.fc_units=[16, 16, 16, 8]",
    "federation.rounds=2",
    "federation.local_epochs=1",
    "federation.batch_size=8",
    "federation.device=cpu",
    "threat_model.samples_per_adversary=10",
    "attacks.1.params.max_iter=2",
    "evaluation.repeats=1",
    "report.plots=false",
]


def run_shrunk(out, *extra: str) -> dict:
    """scenarios/defenses/dp_sgd.toml, shrunk to a few seconds, through the CLI."""
    argv = ["run", str(REPO / "scenarios" / "defenses" / "dp_sgd.toml"), "--out", str(out)]
    argv += ["--no-progress", "--no-cache", *(a for s in [*SHRINK, *extra] for a in ("--set", s))]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_registered_and_end_to_end_run_reports_privacy(tmp_path):
    assert "dp_sgd" in build_host(autoload=False).registry["dp_mechanisms"].names()
    metrics = run_shrunk(tmp_path / "run")
    rep = metrics["tasks"]["synthetic"]["repeats"][0]
    (privacy,) = rep["privacy"]
    assert privacy["mechanism"] == "dp_sgd" and privacy["level"] == "example"
    assert privacy["rounds_accounted"] == 2 and privacy["clip_norm"] == 1.0
    assert 0 < privacy["epsilon"] == max(privacy["epsilon_per_client"])
    assert len(privacy["epsilon_per_client"]) == 3
    last = rep["rounds"][-1]["dp_sgd"]
    assert set(last["epsilon"]) == {"0", "1", "2"} and not any(last["stopped"].values())
    assert metrics["tasks"]["synthetic"]["summary"]["epsilon"]["mean"] == privacy["epsilon"]


def test_interrupted_run_resumes_with_identical_accounting(tmp_path, monkeypatch):
    rounds = "federation.rounds=3"
    want = run_shrunk(tmp_path / "ref", rounds)
    round_end = DPSGD.testbed_round_end

    def crash_in_round_2(self, ctx, record):  # after round 2 trained, before its checkpoint
        if ctx.round == 2:
            raise KeyboardInterrupt
        round_end(self, ctx, record)

    monkeypatch.setattr(DPSGD, "testbed_round_end", hookimpl(crash_in_round_2))
    out = tmp_path / "crashed"
    argv = ["run", str(REPO / "scenarios" / "defenses" / "dp_sgd.toml"), "--out", str(out)]
    argv += ["--no-progress", "--no-cache"]
    assert main(argv + [a for s in [*SHRINK, rounds] for a in ("--set", s)]) != 0
    assert (tmp_path / ".crashed.partial" / "checkpoint").is_dir()
    monkeypatch.setattr(DPSGD, "testbed_round_end", round_end)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert "resumed after round 1" in (out / "run.log").read_text()
    got = json.loads((out / "metrics.json").read_text())
    assert strip_timing(got) == strip_timing(want)
    assert got["tasks"]["synthetic"]["repeats"][0]["privacy"][0]["rounds_accounted"] == 3


def test_dp_sgd_with_adversarial_training_is_refused(tmp_path, capsys):
    """Both replace local training (a firstresult hook): one would silently never run."""
    from test_cli import TINY

    scenario = tmp_path / "both.toml"
    scenario.write_text(
        TINY.replace(
            '[dp]\nname = "paper_dp"\nparams = { clip_norm = 1.0, noise_multiplier = 0.5 }',
            '[dp]\nname = "dp_sgd"\nparams = { noise_multiplier = 1.0 }\n'
            '[[defences]]\nname = "adversarial_training"',
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "dp_sgd and adversarial_training both replace local training" in line
    assert not out.exists()


def test_93_batches_are_accounted_with_the_q_and_steps_opacus_runs():
    # Opacus' Poisson loader for 93 batches samples with rate 1/93 but runs
    # int(1 / (1/93)) = 92 steps and its accountant records q = 1/92; before the fix
    # testbed calibrated target_epsilon with 1/93 and the run ended at 3.021 > 3.0.
    assert int(1 / (1 / 93)) == 92
    cfg = LocalConfig(
        epochs=1, batch_size=1, lr=0.05, momentum=0.0, weight_decay=0.0,
        augment=Augment(hflip=False),
    )  # fmt: skip
    m = mech(target_epsilon=3.0, delta=1e-5)
    c = ctx(1, rounds=1)
    train(m, nn.Sequential(nn.Flatten(), nn.Linear(256, 2)), c, data(n=93), cfg)
    z = m.noise[0]
    assert m.accountants[0].history == [(z, 1 / 92, 92)]
    acc = RDPAccountant()
    for _ in range(92):
        acc.step(noise_multiplier=z, sample_rate=1 / 92)
    spent = m.testbed_privacy_spent()
    assert spent["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0.99 * 3.0 <= spent["epsilon"] <= 3.0
    assert spent["level"] == "example" and spent["against"] == "server"
