import torch

from testbed import hookimpl
from testbed.builtins.models import PaperCNNParams, build_paper_cnn
from testbed.federation import sample_clients, server_step
from testbed.local_training import ClientData, LocalConfig, client_step, get_weights
from testbed.pluginmanager import build_host
from testbed.scenario import Augment
from testbed.state import ClientUpdate, RoundContext

CFG = LocalConfig(
    epochs=1,
    batch_size=8,
    lr=0.05,
    momentum=0.9,
    weight_decay=0.0,
    augment=Augment(hflip=True, rotate_degrees=5),
)


def tiny_model():
    torch.manual_seed(0)
    p = PaperCNNParams(conv_channels=(2, 2, 4, 4, 4, 4), fc_units=(8, 8, 8, 4))
    return build_paper_cnn(p, 1, 16, 2, [0.5], [0.25])


def data(cid: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(cid)
    x = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (20,), generator=g)
    return ClientData(cid, x[:16], y[:16], x[16:], y[16:])


def ctx(seed: int = 0, rnd: int = 1, n: int = 2) -> RoundContext:
    return RoundContext(
        seed=seed,
        round=rnd,
        rounds=3,
        n_clients=n,
        sampled=tuple(range(n)),
        weights={i: 1 / n for i in range(n)},
    )


def test_client_step_is_a_deterministic_function_of_its_inputs():
    hooks = build_host(autoload=False).hook
    model = tiny_model()
    w0 = get_weights(model)
    a = client_step(model, w0, data(), CFG, ctx(seed=1), hooks)
    b = client_step(tiny_model(), w0.clone(), data(), CFG, ctx(seed=1), hooks)
    c = client_step(model, w0, data(), CFG, ctx(seed=2), hooks)
    assert torch.equal(a.delta, b.delta)
    assert not torch.equal(a.delta, c.delta)
    assert a.delta.abs().sum() > 0 and a.n_train == 16
    assert torch.equal(w0, get_weights(tiny_model()))  # the received weights are not mutated


def test_server_step_fedavg_and_downloads_without_defences():
    hooks = build_host(autoload=False).hook
    g = torch.tensor([1.0, 1.0, 1.0])
    ups = [
        ClientUpdate(0, torch.tensor([2.0, 0, 0]), 1, 0.0),
        ClientUpdate(1, torch.tensor([0.0, 4, 0]), 3, 0.0),
    ]
    from testbed.numerics import weighted_mean

    new, downloads, agg = server_step(g, ups, weighted_mean, ctx(), hooks)
    assert torch.allclose(new, torch.tensor([1.5, 4.0, 1.0]))
    assert agg.included == [0, 1]
    assert all(torch.equal(downloads[c], new) for c in (0, 1))


def test_defences_run_in_listed_order_and_can_drop_updates():
    calls = []

    class Tag:
        def __init__(self, name, drop=None):
            self.name, self.drop = name, drop

        @hookimpl
        def testbed_before_aggregation(self, ctx, updates):
            calls.append(self.name)
            for u in updates:
                if u.client_id == self.drop:
                    u.dropped = f"dropped by {self.name}"

    host = build_host(autoload=False)
    ups = [
        ClientUpdate(0, torch.tensor([2.0]), 1, 0.0),
        ClientUpdate(1, torch.tensor([8.0]), 1, 0.0),
    ]
    from testbed.numerics import weighted_mean

    with host.active([Tag("first"), Tag("second", drop=1), Tag("third")]):
        new, _, agg = server_step(torch.zeros(1), ups, weighted_mean, ctx(), host.hook)
    assert calls == ["first", "second", "third"]
    assert agg.included == [0] and torch.allclose(new, torch.tensor([2.0]))
    assert ups[1].dropped == "dropped by second"
    # unregistered after the run
    server_step(torch.zeros(1), ups, weighted_mean, ctx(), host.hook)
    assert calls == ["first", "second", "third"]


def test_client_sampling_without_replacement_and_seeded():
    s = sample_clients(seed=3, rnd=1, n_clients=10, m=4)
    assert len(set(s)) == 4 and all(0 <= c < 10 for c in s)
    assert s == sample_clients(seed=3, rnd=1, n_clients=10, m=4)
    assert {sample_clients(seed=3, rnd=r, n_clients=10, m=4) for r in range(1, 6)} != {s}
