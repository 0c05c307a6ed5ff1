"""FLTrust end to end: the server's root set (carved before partitioning, so no client
holds it, and recorded in metrics.json) and its update g_0, which trust-weights the
uploads; a sign-flipped upload gets trust 0."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import strip_timing

from testbed.assemble import make_clients, make_server
from testbed.builtins.screening_aggregators import FLTrust
from testbed.cache import training_key
from testbed.cli import main
from testbed.data import ImageDataset
from testbed.federation import server_step
from testbed.local_training import LocalConfig
from testbed.pluginmanager import build_host
from testbed.robust_extra import fltrust
from testbed.scenario import Augment
from testbed.scenario_load import validate_document
from testbed.server_data import RootSet, carve_root_set, make_server_data
from testbed.state import ClientUpdate, RoundContext

TINY_FLTRUST = """
[scenario]
name = "tiny-fltrust"
seed = 5
[data]
name = "synthetic"
params = { n_samples = 240, image_size = 16 }
[partition]
name = "iid"
[model]
params = { conv_channels = [4, 4, 8, 8, 8, 8], fc_units = [16, 16, 16, 8], dropout = 0.0 }
[federation]
clients = 5
rounds = 3
local_epochs = 1
batch_size = 16
lr = 0.02
device = "cpu"
[aggregator]
name = "fltrust"
params = { root_size = 40 }
[threat_model]
malicious = [1]
[[poisoning]]
name = "sign_flip"
params = { scale = 4.0 }
[report]
plots = false
save_weights = false
"""


@pytest.fixture(scope="module")
def host():
    return build_host(autoload=False)


def run(tmp_path, name, *args, text=TINY_FLTRUST):
    scenario = tmp_path / "tiny_fltrust.toml"
    scenario.write_text(text)
    out = tmp_path / name
    argv = ["run", str(scenario), "--out", str(out), "--no-progress", *args]
    return main(argv), out


# -- the root set ----------------------------------------------------------------------


def test_stratified_root_set_keeps_the_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = carve_root_set(labels, RootSet(10), seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    # 7, 7, 6 of 20 -> 3.5, 3.5, 3: one more by largest remainder, the tie to class 0
    labels = torch.tensor([0] * 7 + [1] * 7 + [2] * 6)
    idx = carve_root_set(labels, RootSet(10), seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 3, 3]
    assert idx.unique().numel() == 10 and bool((idx[1:] > idx[:-1]).all())


def test_random_root_set_is_seeded():
    labels = torch.arange(100) % 3
    a = carve_root_set(labels, RootSet(20, "random"), seed=1)
    assert a.unique().numel() == 20
    assert torch.equal(a, carve_root_set(labels, RootSet(20, "random"), seed=1))
    assert not torch.equal(a, carve_root_set(labels, RootSet(20, "random"), seed=2))


def test_root_set_as_large_as_the_dataset_is_refused():
    with pytest.raises(ValueError, match="root set of 10 examples"):
        carve_root_set(torch.zeros(10, dtype=torch.int64), RootSet(10), seed=0)


def indexed_dataset(n: int) -> ImageDataset:
    """Images that spell their own index (two pixels: high and low byte)."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) // 256
    x[:, 0, 0, 1] = torch.arange(n) % 256
    return ImageDataset(x=x, y=torch.arange(n) % 2, classes=("no_lesion", "lesion"))


def index_of(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist())


@pytest.mark.parametrize("partition", ["iid", "noniid_chunks"])
def test_root_set_is_disjoint_from_every_clients_data(host, partition):
    doc = {
        "scenario": {"name": "t", "seed": 3},
        "data": {"name": "synthetic"},
        "partition": {"name": partition},
        "federation": {"clients": 4},
        "aggregator": {"name": "fltrust", "params": {"root_size": 30}},
    }
    scenario = validate_document(doc, host.registry, "<test>")
    ds = indexed_dataset(300)
    clients = make_clients(ds, scenario, host, 3, torch.device("cpu"))
    root = set(carve_root_set(ds.y, RootSet(30), 3).tolist())
    held = [index_of(c.x_train) | index_of(c.x_test) for c in clients]
    assert len(root) == 30
    for h in held:
        assert not h & root
    assert set().union(*held) | root == set(range(300))  # the clients share all the rest
    # the server's copy is the same examples
    agg = host.registry.build("aggregators", "fltrust", {"root_size": 30})
    model = torch.nn.Linear(1, 1)
    cfg = LocalConfig(1, 8, 0.1, 0.0, 0.0, Augment())
    server = make_server(ds, scenario, agg, 3, torch.device("cpu"), model, cfg)
    assert index_of(server.root.x_train) == root


# -- the aggregator --------------------------------------------------------------------


class Linear(torch.nn.Module):
    """y = x . w on the image's first pixel: its update is easy to reason about."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(16, 2, bias=False)

    def forward(self, x):
        return self.w(x.flatten(1))


def test_the_aggregator_uses_the_servers_update_from_the_global_model(host):
    ds = indexed_dataset(64)
    model = Linear()
    cfg = LocalConfig(1, 8, 0.5, 0.0, 0.0, Augment(hflip=False))
    server = make_server_data(RootSet(16), ds.x, ds.y, 2, 0, model, cfg, torch.device("cpu"))
    agg = host.registry.build("aggregators", "fltrust", {"root_size": 16})
    g = torch.randn(32, generator=torch.Generator().manual_seed(0))
    ctx = RoundContext(0, 1, 1, 3, (0, 1, 2), {0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    at = server.at(g, ctx)
    g0 = at.update()
    assert at.update() is g0 and server.updates == 1  # trained once per round
    assert float(g0.norm()) > 0
    assert torch.equal(server.update(g, ctx), g0)  # seeded by (seed, round): the same again
    ups = [ClientUpdate(0, g0 * 2, 10, 0.0), ClientUpdate(1, -g0, 10, 0.0)]
    ups.append(ClientUpdate(2, g0 + torch.randn(32, generator=torch.Generator()) * 0.01, 10, 0))
    stacked = torch.stack([u.delta for u in ups])
    new, _, aggregate = server_step(g, ups, agg, ctx, host.hook, server=server)
    want = fltrust(stacked, g0)
    assert torch.allclose(new, g + want.delta)
    assert aggregate.rejected == [1] and aggregate.weights[1] == 0
    with pytest.raises(RuntimeError, match="declares a root_set"):
        server_step(g, ups, agg, ctx, host.hook)


# -- end to end ------------------------------------------------------------------------


def test_fltrust_drops_the_sign_flipped_uploads_end_to_end(tmp_path):
    rc, out = run(tmp_path, "a")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rep = metrics["tasks"]["synthetic"]["repeats"][0]
    for rec in rep["rounds"]:
        w = rec["screening"]["weights"]
        assert rec["screening"]["rejected"] == [1] and w["1"] == 0
        assert all(w[str(c)] > 0 for c in (0, 2, 3, 4))
        assert rec["detection"] == {
            "malicious_dropped": 1, "malicious": 1, "benign_dropped": 0, "benign": 4
        }  # fmt: skip
    assert rep["poisoning"]["detection"]["malicious_dropped"] == 3
    root = rep["server"]["root_set"]
    assert root["size"] == 40 and root["pool"] == 240 and root["sampling"] == "stratified"
    assert root["label_counts"] == [20, 20] and "no client holds" in root["source"]
    assert root["training"]["epochs"] == 1 and root["training"]["lr"] == 0.02
    # the recorded examples are the ones carved from the dataset, and no client has them
    host = build_host(autoload=False)
    ds = host.registry.build("datasets", "synthetic", {"n_samples": 240, "image_size": 16})
    assert root["indices"] == carve_root_set(ds.y, RootSet(40), 5).tolist()
    assert sum(c["train"] + c["test"] for c in rep["clients"]) == 200
    report = (out / "report.md").read_text()
    assert "server root set: 40 of the 240 images (stratified)" in report


def test_same_seed_same_json_other_seed_another_root_set(tmp_path):
    runs = []
    for name, args in (("a", []), ("b", ["--no-cache"]), ("c", ["--seed", "6"])):
        rc, out = run(tmp_path, name, *args)
        assert rc == 0
        runs.append(strip_timing(json.loads((out / "metrics.json").read_text())))
    assert runs[0] == runs[1]
    roots = [r["tasks"]["synthetic"]["repeats"][0]["server"]["root_set"] for r in runs]
    assert roots[0]["indices"] != roots[2]["indices"]


def test_an_interrupted_fltrust_run_resumes_to_the_same_json(tmp_path, monkeypatch):
    rc, ref = run(tmp_path, "ref", "--no-cache")
    assert rc == 0
    real = FLTrust.aggregate

    def interrupt_in_round_3(self, updates, sizes, ctx, clients, server):
        if ctx.round == 3:
            raise KeyboardInterrupt
        return real(self, updates, sizes, ctx, clients, server)

    monkeypatch.setattr(FLTrust, "aggregate", interrupt_in_round_3)
    rc, out = run(tmp_path, "cut", "--no-cache")
    assert rc == 2
    monkeypatch.setattr(FLTrust, "aggregate", real)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert strip_timing(got) == strip_timing(want)


def test_the_root_set_enters_the_cache_key(host):
    doc = {"scenario": {"name": "t"}, "data": {"name": "synthetic"}}
    scenario = validate_document(doc, host.registry, "<test>")
    task = scenario.task_list()[0]
    kw = {"data": "d", "code": {}, "training_defences": []}
    cpu = torch.device("cpu")
    plain = training_key(scenario, task, 0, cpu, **kw)
    assert plain == training_key(scenario, task, 0, cpu, **kw, root_set=None)
    a = training_key(scenario, task, 0, cpu, **kw, root_set=RootSet(100).key())
    b = training_key(scenario, task, 0, cpu, **kw, root_set=RootSet(50).key())
    assert len({plain, a, b}) == 3


def test_a_root_set_larger_than_the_data_is_one_line_exit_2(tmp_path, capsys):
    rc, out = run(tmp_path, "big", "--set", "aggregator.params.root_size=240")
    assert rc == 2 and not out.exists()
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "aggregator 'fltrust': a root set of 240 examples" in line


def test_bad_fltrust_params_are_one_line_each(tmp_path, capsys):
    rc, _ = run(
        tmp_path, "bad", "--set", "aggregator.params.root_size=0",
        "--set", 'aggregator.params.root_sampling="balanced"',
    )  # fmt: skip
    assert rc == 2
    lines = capsys.readouterr().err.splitlines()
    assert any("root_size" in x for x in lines) and any("root_sampling" in x for x in lines)
    assert len([x for x in lines if "root_" in x]) == 2


@pytest.mark.slow
def test_fltrust_same_on_flower(tmp_path):
    """The server's update runs in the Strategy's process, the ClientApps carve the same
    root set out of their data: the same weights every round, the same trust scores."""
    pytest.importorskip("flwr")
    from test_flower import assert_same_federation, run_both

    scenario = tmp_path / "fltrust.toml"
    scenario.write_text(TINY_FLTRUST.replace("rounds = 3", "rounds = 2"))
    runs = run_both(tmp_path, scenario)
    metrics = assert_same_federation(runs, "synthetic", 5, 2)
    rep = metrics["flower"]["tasks"]["synthetic"]["repeats"][0]
    assert rep["poisoning"]["detection"]["malicious_dropped"] == 2
    assert rep["server"]["root_set"]["size"] == 40
