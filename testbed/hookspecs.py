"""The public plugin API of testbed: every hook a plugin can implement.

Built-in components use exactly these hooks (see ``testbed/builtins``), through the
same ``testbed`` entry-point group that third-party packages use. Hook names are
prefixed ``testbed_``. Read top to bottom: registration first, then the federated
lifecycle in the order the engine calls it.

Lifecycle hooks receive mutable records (``ClientUpdate``, ``Aggregate``,
``Broadcast``, ``InferenceBatch``) and act by changing them in place; they return
nothing. Implementations run in reverse registration order, as in pluggy; the
engine registers a scenario's defences so that the first one listed runs first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from testbed import hookspec

if TYPE_CHECKING:
    from torch import Generator, nn

    from testbed.local_training import ClientData, LocalConfig
    from testbed.registry import KindRegistry
    from testbed.state import Aggregate, Broadcast, ClientUpdate, InferenceBatch, RoundContext

# --------------------------------------------------------------------------------------
# Registration: called once when the plugin manager is built. Each receives the
# registry of one component kind; call ``registry.add(name, factory, params=Model)``.
# ``Model`` is a pydantic model (extra="forbid") checked when a scenario is validated;
# ``factory(params, **kw)`` builds the component for a run.
# --------------------------------------------------------------------------------------


@hookspec
def testbed_register_datasets(registry: KindRegistry) -> None:
    """Register datasets. ``factory(params, data_root=Path | None) -> ImageDataset``."""


@hookspec
def testbed_register_partitioners(registry: KindRegistry) -> None:
    """Register partitioners.

    ``factory(params) -> fn(labels: Tensor, n_clients: int, generator) -> list[Tensor]``,
    returning one index tensor per client; together disjoint and complete
    (``testbed.assemble.partition_problem``; otherwise a plugin error).
    """


@hookspec
def testbed_register_models(registry: KindRegistry) -> None:
    """Register models. ``factory(params, in_channels, image_size, num_classes, mean, std)``
    returns an ``nn.Module`` taking pixels in [0, 1] (normalisation inside the model)."""


@hookspec
def testbed_register_aggregators(registry: KindRegistry) -> None:
    """Register aggregators. ``factory(params) -> fn(updates: Tensor[k, d],
    sizes: Tensor[k]) -> Tensor[d]``: the k kept updates (dropped ones are left out) and
    each one's raw training-set size ``n_train`` as floats, not normalised; an aggregator
    that weights by them divides by their sum itself (``testbed.numerics.weighted_mean``).
    Raise ValueError when it cannot aggregate (too few updates): the round keeps the
    global model and records a server event. Or an object with ``aggregate(updates,
    sizes, ctx, clients) -> Screening`` (delta, per-row weights, kept mask; ``clients``
    the rows' client ids), and optionally ``state_dict``/``load_state_dict`` for state
    kept across rounds: the engine records whom it dropped and checkpoints its state.
    Such an object may declare ``root_set = testbed.server_data.RootSet(...)``: the engine
    then carves that many examples from the dataset before partitioning (no client holds
    them) and passes ``server=`` (a ``ServerRound``: the root set, the round's global
    model, ``update()`` trained on the root set) to ``aggregate``."""


@hookspec
def testbed_register_dp_mechanisms(registry: KindRegistry) -> None:
    """Register differential-privacy mechanisms.

    ``factory(params) -> object`` whose ``@hookimpl`` methods (any lifecycle hook below,
    and ``testbed_privacy_spent``) are registered for the duration of a run.
    """


@hookspec
def testbed_register_defences(registry: KindRegistry) -> None:
    """Register defences. ``factory(params) -> object`` with ``@hookimpl`` methods for the
    lifecycle hooks below; the object is registered for the duration of a run."""


@hookspec
def testbed_register_attacks(registry: KindRegistry) -> None:
    """Register evasion attacks. ``factory(params, estimator) -> art EvasionAttack``, where
    ``estimator`` is an ART ``PyTorchClassifier`` with clip_values (0, 1)."""


@hookspec
def testbed_register_poisoning(registry: KindRegistry) -> None:
    """Register training-time attacks, run by the compromised clients of
    ``[threat_model]``. ``factory(params) -> object`` with any of these methods:

    - ``poison_data(x, y, num_classes, generator) -> (x, y)``: once per compromised client
      and run, on its training images (uint8 N x C x H x W) and labels, before training;
      raise ValueError for a task it cannot attack (e.g. a class that does not exist).
      What it returns must still be the task's data (uint8 images of the same shape, one
      label in range per image), or the run stops with one line.
    - ``poison_update(update, benign, ctx, generator) -> Tensor[d]``: on the server side of
      each round, before screening, for each sampled compromised client: ``update`` is its
      honest flat update; ``benign`` the sampled benign clients' updates ``[k, d]`` when
      ``threat_model.collude`` is true, else None (an attack that needs them refuses to
      validate without collude, through ``check``).
    - ``backdoor_test(x, y) -> (x_triggered, target)`` and ``label_map(num_classes) ->
      list[int]``: what the report measures (backdoor success, targeted error).
    """


@hookspec
def testbed_register_engines(registry: KindRegistry) -> None:
    """Register execution engines, chosen by ``[engine] name``. ``factory(params) ->
    runner`` with ``runner.run(scenario, device, body) -> T``: it calls ``body(engine)``
    once for the whole run, where ``engine.round_step(setup)`` returns the function that
    trains one round (``testbed.engines.Engine``). Built-ins: "inprocess", "batched"
    (``testbed.batched``) and "flower" (a Flower simulation around the run)."""


# --------------------------------------------------------------------------------------
# Federated lifecycle, in call order within one round.
# --------------------------------------------------------------------------------------


@hookspec
def testbed_training_inputs(batch: InferenceBatch) -> None:
    """Once per run and client, before training: ``batch.x`` holds that client's training
    images (float pixels in [0, 1]); change them to give the client its own input
    pipeline. Pair it with ``testbed_inference_input`` for the client's deployed model.
    Draw any randomness from ``batch.generator`` (fixed by the seed and the client)."""


@hookspec(firstresult=True)
def testbed_local_training(
    ctx: RoundContext, model: nn.Module, data: ClientData, cfg: LocalConfig, generator: Generator
) -> float | None:
    """On a sampled client, to replace its local training (DP-SGD, adversarial training).
    Train ``model`` in place from the weights it holds (the ones the client received),
    drawing randomness from ``generator`` (and torch's global RNG, seeded per client and
    round); return the mean training loss. Return None to leave the client to the next
    implementation; the default is plain SGD for ``cfg.epochs`` epochs. The first
    non-None result wins."""


@hookspec
def testbed_client_update(ctx: RoundContext, update: ClientUpdate) -> None:
    """On a client, after local training and before upload. ``update.delta`` (flat
    tensor, new weights minus received weights) may be changed in place or replaced;
    e.g. uplink clipping."""


@hookspec
def testbed_before_aggregation(ctx: RoundContext, updates: list[ClientUpdate]) -> None:
    """On the server, once all sampled clients uploaded. Change ``update.delta`` or set
    ``update.dropped = "reason"`` to exclude an update; e.g. norm bounds, filters."""


@hookspec
def testbed_after_aggregation(ctx: RoundContext, aggregate: Aggregate) -> None:
    """On the server, after the aggregator combined the updates into
    ``aggregate.delta``; e.g. central noise, privacy accounting."""


@hookspec
def testbed_broadcast(ctx: RoundContext, broadcast: Broadcast) -> None:
    """On the server, once per client (every client, sampled or not), before sending it
    the new model ``broadcast.weights``; e.g. per-client downlink noise."""


@hookspec
def testbed_round_end(ctx: RoundContext, record: dict[str, Any]) -> None:
    """After a round; ``record`` is what the report keeps for it. Add keys to it."""


@hookspec
def testbed_inference_input(batch: InferenceBatch) -> None:
    """Before a deployed client model classifies ``batch.x`` (pixels in [0, 1]), in
    evaluation and when adversarial examples are scored; e.g. input transformations.
    Draw any randomness from ``batch.generator`` (fixed by the seed, the client and the
    batch's purpose): it is the same whether training ran or the cache served it."""


@hookspec
def testbed_attack_preprocessing(client_id: int) -> list[Any] | None:
    """When client ``client_id`` crafts adversarial examples on its own model: ART
    preprocessors to put in front of that model, so that an adaptive adversary attacks the
    defended model (ART passes gradients through them, identity/BPDA where they are not
    differentiable). Return None for a non-adaptive defence."""


@hookspec
def testbed_privacy_spent() -> dict[str, Any] | None:
    """After training: the privacy this plugin's mechanism spent over all rounds so far,
    as a dict with at least ``mechanism``, ``accountant``, ``epsilon``, ``delta``, and at
    what ``level`` ("client", "example"), ``against`` whom and under which client
    ``sampling`` it holds (testbed.privacy.record_problem; a record without them is a
    plugin error)."""
