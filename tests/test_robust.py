"""Robust aggregation rules on tiny hand-computed arrays, and their scenario checks."""

import tomllib

import pytest
import torch
from conftest import REPO

from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.robust import bulyan, coordinate_median, krum, krum_scores, multi_krum, trimmed_mean
from testbed.scenario_load import validate_document


@pytest.fixture(scope="module")
def registry():
    return build_host(autoload=False).registry


# Five clients on a line plus one far outlier (shared by the Krum tests).
LINE = torch.tensor(
    [
        [0.0, 0, 0, 0],
        [1, 0, 0, 0],
        [2, 0, 0, 0],
        [4, 0, 0, 0],
        [100, 100, 100, 100],
    ]
)


def test_coordinate_median_odd_k():
    # Prepare
    u = torch.tensor([[1.0, 5, -2, 0], [3, 1, 4, 10], [2, 9, 0, -1]])
    # Execute
    out = coordinate_median(u)
    # Assert: middle of {1,2,3}, {1,5,9}, {-2,0,4}, {-1,0,10}
    assert torch.equal(out, torch.tensor([2.0, 5, 0, 0]))


def test_coordinate_median_even_k_averages_the_middle_two():
    u = torch.tensor([[1.0, 5, -2, 0], [3, 1, 4, 10], [2, 9, 0, -1], [0, 2, 6, 3]])
    out = coordinate_median(u)
    # sorted columns {0,1,2,3}, {1,2,5,9}, {-2,0,4,6}, {-1,0,3,10}: (1+2)/2, (2+5)/2, ...
    assert torch.equal(out, torch.tensor([1.5, 3.5, 2.0, 1.5]))


def test_trimmed_mean_drops_floor_beta_k_from_each_end():
    u = torch.tensor(
        [[1.0, 0, 10, -4], [2, 100, 0, 0], [3, -100, 20, 4], [4, 1, 30, 2], [50, 2, 40, -2]]
    )
    # beta = 0.2, k = 5: drop 1 per side. {2,3,4}, {0,1,2}, {10,20,30}, {-2,0,2}
    assert torch.allclose(trimmed_mean(u, 0.2), torch.tensor([3.0, 1, 20, 0]))
    # beta = 0.1: floor(0.5) = 0, the plain mean; column 0 is (1+2+3+4+50)/5
    assert torch.allclose(trimmed_mean(u, 0.1), u.mean(dim=0))
    assert trimmed_mean(u, 0.1)[0].item() == pytest.approx(12.0)


def test_trimmed_mean_rejects_beta_outside_range():
    with pytest.raises(ValueError, match="trimmed_mean"):
        trimmed_mean(torch.zeros(3, 4), 0.5)


def test_krum_scores_hand_computed():
    # k = 5, f = 1: each score sums the k - f - 2 = 2 smallest squared distances.
    # Line points 0, 1, 2, 4: d2(0,1)=1 d2(0,2)=4 d2(0,4)=16 d2(1,2)=1 d2(1,4)=9 d2(2,4)=4.
    # s(0)=1+4=5  s(1)=1+1=2  s(2)=1+4=5  s(4)=4+9=13
    # outlier: d2 to 4 = 96^2 + 3*100^2 = 39216, to 2 = 98^2 + 30000 = 39604 -> 78820
    scores = krum_scores(LINE, f=1)
    assert torch.allclose(scores, torch.tensor([5.0, 2, 5, 13, 78820]))


def test_krum_picks_the_outlier_free_update():
    assert torch.equal(krum(LINE, f=1), torch.tensor([1.0, 0, 0, 0]))


def test_multi_krum_averages_the_m_best():
    # Scores 5, 2, 5, 13, 78820: the four best are the line points, mean x = 7/4.
    assert torch.allclose(multi_krum(LINE, f=1, m=4), torch.tensor([1.75, 0, 0, 0]))
    # m = 1 is Krum
    assert torch.equal(multi_krum(LINE, f=1, m=1), krum(LINE, f=1))
    with pytest.raises(ValueError, match="multi_krum"):
        multi_krum(LINE, f=1, m=6)


def test_krum_rejects_too_few_updates():
    with pytest.raises(ValueError, match=r"krum needs k > 2f \+ 2 updates, got k = 4 with f = 1"):
        krum(LINE[:4], f=1)
    with pytest.raises(ValueError, match="multi_krum"):
        multi_krum(LINE[:4], f=1, m=2)


def test_bulyan_hand_computed():
    # k = 7, f = 1: theta = 5 selected by iterated Krum, beta = 3 averaged per coordinate.
    # Six honest updates x * s on a line (x = 0, 1, 2, 3, 6, 10; s = [1, -1, 2, 0.5]) and a
    # far outlier; squared distances are 6.25 (x_i - x_j)^2, so rank by (x_i - x_j)^2:
    #  7 left, 4 nearest: s(0)=1+4+9+36=50 s(1)=1+1+4+25=31 s(2)=4+1+1+16=22
    #          s(3)=9+4+1+9=23 s(6)=9+16+16+25=66 s(10)=16+49+64+81=210  -> take 2
    #  6 left, 3 nearest: s(0)=1+9+36=46 s(1)=1+4+25=30 s(3)=9+4+9=22 s(6)=9+16+25=50
    #          s(10)=16+49+81=146                                         -> take 3
    #  5 left, 2 nearest: s(0)=1+36=37 s(1)=1+25=26 s(6)=16+25=41 s(10)=16+81=97 -> take 1
    #  4 left, 1 nearest (floor of one neighbour): s(0)=36 s(6)=16 s(10)=16 -> take 6
    #  3 left: s(0)=100 s(10)=100                                        -> take 0
    # Selected x = {2, 3, 1, 6, 0}; median 2; the 3 closest are 2, 1, 3: mean x = 2.
    s = torch.tensor([1.0, -1, 2, 0.5])
    xs = torch.tensor([0.0, 1, 2, 3, 6, 10])
    u = torch.cat([xs[:, None] * s, torch.full((1, 4), 100.0)])
    assert torch.allclose(bulyan(u, f=1), 2 * s)


def test_bulyan_rejects_too_few_updates():
    with pytest.raises(ValueError, match=r"bulyan needs k >= 4f \+ 3 updates, got k = 6"):
        bulyan(torch.zeros(6, 4), f=1)


def test_aggregators_ignore_training_set_sizes(registry):
    u = torch.tensor([[1.0, 5, -2, 0], [3, 1, 4, 10], [2, 9, 0, -1]])
    median = registry.build("aggregators", "median", {})
    equal, skewed = torch.ones(3), torch.tensor([1.0, 1.0, 1000.0])
    assert torch.equal(median(u, equal), median(u, skewed))
    assert torch.equal(median(u, skewed), torch.tensor([2.0, 5, 0, 0]))


def test_krum_plugin_raises_when_a_round_has_too_few_updates(registry):
    agg = registry.build("aggregators", "krum", {"f": 1})
    assert torch.equal(agg(LINE, torch.ones(5)), torch.tensor([1.0, 0, 0, 0]))
    # a defence dropped two of five updates: Krum cannot run on three
    with pytest.raises(ValueError, match="krum needs"):
        agg(LINE[:3], torch.ones(3))


def test_multi_krum_plugin_defaults_m_to_n_minus_f(registry):
    agg = registry.build("aggregators", "multi_krum", {"f": 1})
    # m = 5 - 1 = 4: the four line points, mean x = 1.75
    assert torch.allclose(agg(LINE, torch.ones(5)), torch.tensor([1.75, 0, 0, 0]))


# -- validation against the scenario ---------------------------------------------------


def quickstart(clients: int, aggregator: dict, sampled: int | None = None) -> dict:
    doc = tomllib.loads((REPO / "scenarios" / "quickstart.toml").read_text())
    doc["federation"]["clients"] = clients
    if sampled is not None:
        doc["federation"]["sampled"] = sampled
    doc["aggregator"] = aggregator
    return doc


def messages(doc: dict, registry) -> list[str]:
    with pytest.raises(ScenarioError) as exc:
        validate_document(doc, registry, "f.toml")
    return [str(p) for p in exc.value.problems]


def test_validate_rejects_krum_with_too_few_sampled_clients(registry):
    doc = quickstart(3, {"name": "krum", "params": {"f": 1}})
    assert messages(doc, registry) == [
        "f.toml: aggregator.params: krum needs n > 2f + 2 updates per round: "
        "n = 3 sampled clients, f = 1"
    ]


def test_validate_accepts_krum_with_five_clients(registry):
    s = validate_document(quickstart(5, {"name": "krum", "params": {"f": 1}}), registry, "f.toml")
    assert s.aggregator.params == {"f": 1}


def test_validate_counts_sampled_clients_not_all_clients(registry):
    doc = quickstart(10, {"name": "krum", "params": {"f": 1}}, sampled=4)
    (msg,) = messages(doc, registry)
    assert "n = 4 sampled clients" in msg


def test_validate_rejects_bulyan_multi_krum_and_empty_trim(registry):
    (msg,) = messages(quickstart(6, {"name": "bulyan", "params": {"f": 1}}), registry)
    assert "bulyan needs n >= 4f + 3 updates per round: n = 6 sampled clients, f = 1" in msg
    (msg,) = messages(quickstart(5, {"name": "multi_krum", "params": {"f": 1, "m": 6}}), registry)
    assert "multi_krum needs m <= n" in msg
    (msg,) = messages(quickstart(3, {"name": "trimmed_mean", "params": {"beta": 0.2}}), registry)
    assert "trimmed_mean trims floor(beta * n) = 0" in msg
    validate_document(quickstart(7, {"name": "bulyan", "params": {"f": 1}}), registry, "f.toml")
    validate_document(
        quickstart(5, {"name": "trimmed_mean", "params": {"beta": 0.2}}), registry, "f.toml"
    )


def test_geometric_median_plugin_ignores_sizes_unless_weighted(registry):
    # {0, 1, 10} on a line: unweighted median 1; with sizes [5, 1, 1] the point 0 outweighs
    # the other two together and is the weighted geometric median.
    u = torch.tensor([[0.0, 0], [1, 0], [10, 0]])
    sizes = torch.tensor([5.0, 1, 1]) / 7
    plain = registry.build("aggregators", "geometric_median", {})
    assert torch.allclose(plain(u, sizes), torch.tensor([1.0, 0]), atol=1e-4)
    weighted = registry.build("aggregators", "geometric_median", {"weighted": True})
    assert torch.allclose(weighted(u, sizes), torch.zeros(2), atol=1e-4)


def test_validate_accepts_geometric_median_and_rejects_bad_params(registry):
    doc = quickstart(3, {"name": "geometric_median", "params": {"max_iter": 10}})
    assert validate_document(doc, registry, "f.toml").aggregator.params["max_iter"] == 10
    (msg,) = messages(quickstart(3, {"name": "geometric_median", "params": {"nu": 0}}), registry)
    assert "aggregator.params" in msg and "nu" in msg
