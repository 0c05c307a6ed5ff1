"""The server side on Flower: a ``Strategy`` whose sampling, per-client downloads and
aggregation are testbed's own (`round_context`, `finish_round`), so every server-side
hook (screening, aggregator, norm bound, central DP, per-client downlink noise) runs
exactly as in the in-process engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from testbed.engines import RoundStep, TrainingSetup
from testbed.federation import ClientUpdate, FederationState, finish_round, round_context
from testbed.flower.messages import (
    TRAIN_CONFIG,
    client_states,
    from_record,
    load_client_states,
    pack,
    to_record,
    unpack,
)
from testbed.rundir import RunError
from testbed.scenario import resolved_dict

log = logging.getLogger("testbed")

NODE_WAIT_S = 120.0
"""How long to wait for every site's SuperNode to connect (deployment)."""
PULL_INTERVAL_S = 0.1
"""How often the server polls for replies (Flower's in-memory grid default)."""


def run_description(setup: TrainingSetup) -> bytes:
    """Everything a ClientApp needs to rebuild this federation's clients on its side."""
    return pack(
        {
            "scenario": resolved_dict(setup.scenario),
            "task": setup.task.name,
            "seed": setup.seed,
            "device": setup.device.type,
            "data_root": None if setup.data_root is None else str(setup.data_root),
            "modules": list(setup.host.modules),
            # Intra-op threads change float summation order, and training amplifies it
            # (1e-3 apart after one round at 1 vs 2 threads): a site uses its CPU share.
            "threads": max(1, int(setup.scenario.engine.client_cpus)),
        }
    )


CLIENT_SIDE_HOOKS = (
    "testbed_client_update",
    "testbed_local_training",
    "testbed_training_inputs",
    "testbed_inference_input",
)
"""Hooks that run where a client's data lives: in the ClientApp on Flower."""


def declares_client_state(obj: object) -> bool:
    """Whether a plugin object says what Flower must do with its state: carry it per
    client (``client_state``/``load_client_state``) or nothing (``stateless = True``)."""
    if callable(getattr(obj, "client_state", None)) and callable(
        getattr(obj, "load_client_state", None)
    ):
        return True
    return getattr(type(obj), "stateless", False) is True


def check_client_state_support(per_run: list[object]) -> None:
    """Refuse, before training, a client-side plugin object that does not declare its
    state. On Flower each ClientApp has its own copy of the object: whatever it keeps
    (counters, per-client facts for `testbed_round_end`) would stay in the client's
    process and the server's copy would report nothing, with exit code 0. Whether an
    object keeps state cannot be seen from outside (attributes may be configuration), so
    it has to say so."""
    for obj in per_run:
        hooks = [h for h in CLIENT_SIDE_HOOKS if hasattr(obj, h)]
        if hooks and not declares_client_state(obj):
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
            raise RunError(
                f"{name} runs on the clients ({', '.join(hooks)}) but declares neither "
                "client_state/load_client_state nor `stateless = True`, so the flower "
                "engine cannot keep its state (see docs/plugins.md)"
            )


class TestbedStrategy(Strategy):
    """Flower Strategy adapter over testbed's server step. It holds the federation state
    between `configure_train` and `aggregate_train`; the global ``arrays`` Flower passes
    in are not used, because each client receives its own download (downlink noise)."""

    def __init__(self, setup: TrainingSetup) -> None:
        check_client_state_support(setup.per_run)
        self.setup = setup
        self.run_blob = run_description(setup)
        self.state: FederationState | None = None
        self.nodes: dict[int, int] = {}
        """testbed client id -> Flower node id"""
        self._ctx = None

    # -- which node is which client ---------------------------------------------------

    def map_nodes(self, grid: Grid, exchange: Callable[[list[Message]], list[Message]]) -> None:
        """Ask every node for its ``partition-id`` (node config): client i is the node
        that says i, in simulation and in deployment alike."""
        n = len(self.setup.clients)
        deadline = time.monotonic() + NODE_WAIT_S
        while len(ids := list(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise RunError(f"{len(ids)} Flower nodes connected, the scenario has {n} clients")
            time.sleep(0.5)
        queries = [
            Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in ids
        ]
        for reply in exchange(queries):
            if reply.has_error():
                raise RunError(f"Flower node {reply.metadata.src_node_id}: {reply.error.reason}")
            pid = int(reply.content["config"]["partition-id"])
            self.nodes[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(n)) - set(self.nodes))
        if missing:
            raise RunError(
                f"no Flower node answered with partition-id {missing} "
                f"(answers: {sorted(self.nodes)} of {len(ids)} nodes)"
            )

    # -- Strategy ---------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        s = self.setup
        assert self.state is not None and server_round == self.state.round + 1
        fed = s.scenario.federation
        ctx = round_context(
            self.state, s.clients, seed=s.seed, rounds=fed.rounds, m=fed.m,
            sampling=fed.client_sampling,
        )  # fmt: skip
        self._ctx = ctx
        messages = []
        for cid in ctx.sampled:
            conf = ConfigRecord(
                {
                    "run": self.run_blob,
                    "client": cid,
                    "round": ctx.round,
                    "sampled": list(ctx.sampled),
                    "weights": [ctx.weights[c] for c in ctx.sampled],
                    "states": pack(client_states(s.per_run, cid)),
                }
            )
            content = RecordDict(
                {"arrays": to_record(self.state.client_weights[cid]), TRAIN_CONFIG: conf}
            )
            messages.append(
                Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN)
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        s, ctx, state = self.setup, self._ctx, self.state
        assert ctx is not None and state is not None and ctx.round == server_round
        cid_of = {node: cid for cid, node in self.nodes.items()}
        updates: dict[int, ClientUpdate] = {}
        for reply in replies:
            cid = cid_of.get(reply.metadata.src_node_id)
            if reply.has_error():
                raise RunError(f"client {cid}'s ClientApp failed: {reply.error.reason}")
            conf = reply.content[TRAIN_CONFIG]
            cid = int(conf["client"])
            load_client_states(s.per_run, cid, unpack(conf["states"]))
            metrics = reply.content["metrics"]
            updates[cid] = ClientUpdate(
                cid,
                from_record(reply.content["arrays"], state.global_weights.device),
                int(metrics["n_train"]),
                float(metrics["loss"]),
                info=unpack(conf["info"]),
            )
        events = [
            {"client": c, "kind": "no_reply", "detail": "no reply before the timeout",
             "action": "dropped"}
            for c in ctx.sampled if c not in updates
        ]  # fmt: skip
        ordered = [updates[c] for c in ctx.sampled if c in updates]
        # Model poisoning runs here, on the server side, where the benign uploads that
        # colluding attackers read are (docs/flower.md); so does the server's own update
        # on its root set (FLTrust), in this process, which holds the dataset.
        self.state = finish_round(
            state, ctx, ordered, s.aggregator, s.host.hook, s.policy, events,
            threat=s.threat, server=s.server,
        )  # fmt: skip
        losses = [u.loss for u in ordered]
        loss = sum(losses) / len(losses) if losses else float("nan")
        return to_record(self.state.global_weights), MetricRecord({"train_loss": loss})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # testbed evaluates (clean accuracy, attacks) after training

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        s = self.setup
        log.info(
            "flower strategy: %s, %d clients, aggregator %s",
            s.task.name, len(s.clients), s.scenario.aggregator.name,
        )  # fmt: skip


class FlowerEngine:
    """Runs each round through a Flower ``Grid``: from `simulation` (Ray) or from the
    deployment engine's ServerApp. Setting ``stop`` makes a waiting round give up."""

    name = "flower"

    def __init__(self, grid: Grid, timeout_s: float, stop: threading.Event | None = None) -> None:
        self.grid = grid
        self.timeout_s = timeout_s
        self.stop = stop or threading.Event()

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Flower's ``Grid.send_and_receive``, written out so that it also gives up when
        ``stop`` is set: when Flower's simulation runtime crashes, nothing would ever reply
        and the stock call would block for the whole timeout (an hour by default)."""
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.timeout_s
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            if self.stop.is_set():
                raise RunError("the Flower runtime stopped while a round was waiting")
            got = list(self.grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(PULL_INTERVAL_S)
        return replies

    def round_step(self, setup: TrainingSetup) -> RoundStep:
        strategy = TestbedStrategy(setup)
        strategy.map_nodes(self.grid, self.exchange)

        def step(state: FederationState, on_client_done: Callable[[int], None]) -> FederationState:
            strategy.state = state
            rnd = state.round + 1
            messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), self.grid)
            replies = self.exchange(list(messages))
            cid_of = {node: cid for cid, node in strategy.nodes.items()}
            for r in replies:
                on_client_done(cid_of.get(r.metadata.src_node_id, -1))
            strategy.aggregate_train(rnd, replies)
            assert strategy.state is not None
            return strategy.state

        return step
