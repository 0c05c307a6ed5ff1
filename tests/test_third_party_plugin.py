"""The example defence in plugins/testbed-normfilter, installed as its own distribution,
is found through the entry-point group and acts in a real run like a built-in."""

import json
import sys

import pytest
import torch

from testbed.cli import main
from testbed.pluginmanager import build_host
from testbed.state import ClientUpdate, RoundContext


@pytest.fixture(scope="module")
def host():
    h = build_host(autoload=True)
    if "norm_filter" not in h.registry["defences"].components:
        pytest.fail(
            "testbed-normfilter is not installed: pip install -e plugins/testbed-normfilter"
        )
    return h


def test_discovered_through_entry_points_with_version_and_hooks(host):
    (info,) = [i for i in host.plugins() if i.distribution == "testbed-normfilter"]
    assert info.version == "0.1.0"
    assert "testbed_register_defences" in info.hooks
    assert host.registry["defences"].get("norm_filter").plugin == info.name


def test_autoload_off_keeps_only_builtins():
    h = build_host(autoload=False)
    assert "norm_filter" not in h.registry["defences"].components
    assert "fedavg" in h.registry["aggregators"].components


def test_drops_outlying_update(host):
    f = host.registry.build("defences", "norm_filter", {"factor": 2.0})
    ups = [ClientUpdate(i, torch.full((4,), v), 1, 0.0) for i, v in enumerate([1.0, 1.2, 0.9, 9.0])]
    ctx = RoundContext(
        seed=0,
        round=1,
        rounds=1,
        n_clients=4,
        sampled=(0, 1, 2, 3),
        weights=dict.fromkeys(range(4), 0.25),
    )
    f.testbed_before_aggregation(ctx=ctx, updates=ups)
    assert [u.dropped is not None for u in ups] == [False, False, False, True]


def test_runs_in_a_scenario_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESTBED_DISABLE_PLUGIN_AUTOLOAD", "0")
    scenario = tmp_path / "normfilter.toml"
    scenario.write_text("""
[scenario]
name = "normfilter"
[data]
name = "synthetic"
params = { n_samples = 120, image_size = 16 }
[model]
params = { conv_channels = [4, 4, 8, 8, 8, 8], fc_units = [16, 16, 16, 8] }
[federation]
clients = 4
rounds = 2
local_epochs = 1
device = "cpu"
[[defences]]
name = "norm_filter"
params = { factor = 1.5 }
[report]
plots = false
save_weights = false
""")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["tasks"]["synthetic"]["repeats"][0]["rounds"]
    assert all("norm_filter_dropped" in r for r in rounds)
    resolved = json.loads((out / "scenario.json").read_text())
    assert resolved["defences"] == [
        {"name": "norm_filter", "params": {"factor": 1.5, "min_updates": 3}}
    ]


def test_a_plugin_entry_points_siblings_are_part_of_the_code_fingerprint(tmp_path, monkeypatch):
    """An entry point such as ``mypkg.plugin`` imports its package's other modules; an edit
    to one of them is other code, so the cache key and the resume check must see it."""
    from testbed.fingerprint import code_fingerprint

    pkg = tmp_path / "sibling_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "maths.py").write_text("def scale(x):\n    return 2 * x\n")
    (pkg / "plugin.py").write_text(
        "from testbed import hookimpl\nfrom sibling_pkg.maths import scale\n\n\n"
        "@hookimpl\ndef testbed_register_aggregators(registry):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        before = code_fingerprint(build_host(autoload=False, extra_modules=["sibling_pkg.plugin"]))
        (pkg / "maths.py").write_text("def scale(x):\n    return 30 * x\n")  # size differs
        after = code_fingerprint(build_host(autoload=False, extra_modules=["sibling_pkg.plugin"]))
    finally:
        for name in ("sibling_pkg", "sibling_pkg.plugin", "sibling_pkg.maths"):
            sys.modules.pop(name, None)
    assert "sibling_pkg" in before and before["sibling_pkg"] != after["sibling_pkg"]
    assert before["testbed"] == after["testbed"]
