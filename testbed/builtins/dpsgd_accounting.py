"""dp_sgd's privacy accounting: what ``DPSGD`` (dpsgd.py) knows and reports about each client.

One Opacus accountant per client for the whole run, composing every step the client takes
in every round it is sampled in; the noise multiplier (given, or calibrated per client to
``target_epsilon``); the ``budget_epsilon`` stop; the round record and the privacy
statement (``testbed_round_end``, ``testbed_privacy_spent``); and the state a checkpoint or
an engine that trains clients elsewhere (Flower) saves and restores. It is kept apart from
the training hook because it is the part a privacy claim rests on and can be read without
Opacus' per-example gradient machinery. ``DPSGDAccounting`` is a base class, not a
component: ``DPSGD`` extends it, so a mechanism is still one object, one pluggy plugin,
with the same attributes and hooks.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from testbed import hookimpl
from testbed.privacy import ALL_RECIPIENTS, ONE_RECIPIENT, SERVER, opacus_epsilon, viewpoints
from testbed.state import RoundContext

if TYPE_CHECKING:
    # Annotations only: dpsgd.py imports this module for DPSGD's base class.
    from testbed.builtins.dpsgd import DPSGDParams


def _opacus_rate(n: int, batches: int, poisson: bool) -> tuple[int, float]:
    """(steps per epoch, sample rate) exactly as Opacus runs and accounts them. Its
    ``DPDataLoader`` samples with rate 1 / batches but runs int(1 / (1 / batches)) steps,
    which float rounding makes batches - 1 for some counts (93, 99, 105, ...), and
    ``make_private`` then steps the accountant with q = 1 / len(loader) = 1 / steps per
    epoch. Calibrating ``target_epsilon`` or checking ``budget_epsilon`` with 1 / batches
    would disagree with the epsilon Opacus reports (3.021 for a target of 3.0)."""
    if not poisson:
        return batches, 1 / batches
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=1 / batches)
    return len(sampler), 1 / len(sampler)


def _history_to_state(acc: IAccountant) -> dict[str, Any]:
    """An accountant's state as lists, floats and str only (torch.load(weights_only))."""
    return {
        "mechanism": acc.mechanism(),
        "history": [[float(z), float(q), int(n)] for z, q, n in acc.history],
    }


class DPSGDAccounting:
    """Per-client accountants, noise multipliers, budget stops and round steps of one
    dp_sgd run, with the hooks and state methods that read them."""

    name: str
    """The component's name, set by ``DPSGD``: the round record's key and the privacy
    statement's mechanism."""

    def __init__(self, p: DPSGDParams) -> None:
        self.p = p
        self.accountants: dict[int, IAccountant] = {}
        self.noise: dict[int, float] = {}
        """Per-client noise multiplier (differs by client size with target_epsilon)."""
        self.stopped: dict[int, int] = {}
        """Client -> first round it skipped because of budget_epsilon."""
        self.rounds = 0
        self.round_steps: dict[int, int] = {}

    # ----------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------

    def _accountant(self, cid: int) -> IAccountant:
        if cid not in self.accountants:
            self.accountants[cid] = create_accountant(self.p.accountant)
        return self.accountants[cid]

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        key = tuple((float(z), float(q), int(k)) for z, q, k in history)
        return opacus_epsilon(self.p.accountant, self.p.delta, key)

    def epsilon_of(self, cid: int) -> float:
        acc = self.accountants.get(cid)
        return 0.0 if acc is None else self._epsilon(acc.history)

    def _noise_for(self, cid: int, sample_rate: float, planned_steps: int) -> float:
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier
        if cid not in self.noise:
            # make_private_with_epsilon's calibration, over the whole run's planned steps
            # (its bisection tries huge multipliers, whose optimum is the largest order).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                self.noise[cid] = float(
                    get_noise_multiplier(
                        target_epsilon=self.p.target_epsilon,
                        target_delta=self.p.delta,
                        sample_rate=sample_rate,
                        steps=planned_steps,
                        accountant=self.p.accountant,
                    )
                )
        return self.noise[cid]

    def _over_budget(self, cid: int, z: float, sample_rate: float, steps: int) -> bool:
        """Would this round's steps take the client's epsilon above budget_epsilon?"""
        if self.p.budget_epsilon is None:
            return False
        history = self._accountant(cid).history
        if history and history[-1][:2] == (z, sample_rate):  # as Opacus' step merges them
            trial = [*history[:-1], (z, sample_rate, history[-1][2] + steps)]
        else:
            trial = [*history, (z, sample_rate, steps)]
        return self._epsilon(trial) > self.p.budget_epsilon

    # ----------------------------------------------------------------------------------
    # Reporting and checkpoints
    # ----------------------------------------------------------------------------------

    def _noise_reported(self) -> float:
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier
        return min(self.noise.values(), default=math.nan)

    @hookimpl
    def testbed_round_end(self, ctx: RoundContext, record: dict[str, Any]) -> None:
        self.rounds += 1
        clients = range(max(ctx.n_clients, max(self.accountants, default=-1) + 1))
        record[self.name] = {
            "epsilon": {str(c): self.epsilon_of(c) for c in clients},
            "stopped": {str(c): c in self.stopped for c in clients},
            "stopped_this_round": sorted(
                c for c, r in self.stopped.items() if r == ctx.round and c in ctx.sampled
            ),
            "steps": {str(c): s for c, s in sorted(self.round_steps.items())},
            "noise_multiplier": {
                str(c): self.noise.get(c, self._noise_reported()) for c in clients
            },
        }
        self.round_steps = {}

    @hookimpl
    def testbed_privacy_spent(self) -> dict[str, Any]:
        n = max(self.accountants, default=-1) + 1
        per_client = [self.epsilon_of(c) for c in range(n)]
        note = (
            "example-level DP-SGD per client (each client's images); epsilon is the worst "
            f"client's; per-example gradients clipped to C, noise z*C ({self.p.grad_sample_mode})"
        )
        if not self.p.poisson_sampling:
            note += "; shuffled batches, not Poisson: the epsilon is an approximation"
        if self.stopped:
            note += f"; clients {sorted(self.stopped)} stopped at budget_epsilon"
        eps = max(per_client, default=0.0)
        sampling = "poisson over each client's images, q = 1 / batches per epoch"
        if not self.p.poisson_sampling:
            sampling = "shuffled fixed-size batches (accounted as if Poisson: approximate)"
        return {
            "mechanism": self.name,
            "level": "example",
            # Noise is added on the client: everything it uploads is private, so the
            # guarantee holds against the server and every other client alike.
            "against": SERVER,
            "sampling": sampling,
            "epsilon": eps,
            "epsilon_by_viewpoint": viewpoints(
                {SERVER: eps, ONE_RECIPIENT: eps, ALL_RECIPIENTS: eps}
            ),
            "epsilon_per_client": per_client,
            "delta": self.p.delta,
            "accountant": self.p.accountant,
            "clip_norm": self.p.max_grad_norm,
            "noise_multiplier": self._noise_reported(),
            "noise_multiplier_per_client": [self.noise.get(c) for c in range(n)]
            if self.p.noise_multiplier is None
            else None,
            "stopped_clients": {str(c): r for c, r in sorted(self.stopped.items())},
            "rounds_accounted": self.rounds,
            "note": note,
        }

    def client_state(self, cid: int) -> dict[str, Any]:
        """What this object keeps about one client, for an engine that trains the client in
        another process (Flower): its accountant, noise multiplier, stop round and steps."""
        acc = self.accountants.get(cid)
        return {
            "accountant": None if acc is None else _history_to_state(acc),
            "noise": self.noise.get(cid),
            "stopped": self.stopped.get(cid),
            "steps": self.round_steps.get(cid),
        }

    def load_client_state(self, cid: int, state: dict[str, Any]) -> None:
        for attr, value in (
            ("accountants", None if state["accountant"] is None else
             self._accountant_from(state["accountant"])),
            ("noise", state["noise"]),
            ("stopped", state["stopped"]),
            ("round_steps", state["steps"]),
        ):  # fmt: skip
            table = getattr(self, attr)
            if value is None:
                table.pop(cid, None)
            else:
                table[cid] = value

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the per-client accounting after a crash."""
        return {
            "accountants": {str(c): _history_to_state(a) for c, a in self.accountants.items()},
            "noise": {str(c): z for c, z in self.noise.items()},
            "stopped": {str(c): r for c, r in self.stopped.items()},
            "rounds": self.rounds,
        }

    def _accountant_from(self, st: dict[str, Any]) -> IAccountant:
        acc = create_accountant(self.p.accountant)
        if st["mechanism"] != acc.mechanism():
            raise ValueError(f"saved accountant {st['mechanism']!r}, scenario {acc.mechanism()!r}")
        acc.history = [(float(z), float(q), int(k)) for z, q, k in st["history"]]
        return acc

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountants = {
            int(c): self._accountant_from(st) for c, st in state["accountants"].items()
        }
        self.noise = {int(c): float(z) for c, z in state["noise"].items()}
        self.stopped = {int(c): int(r) for c, r in state["stopped"].items()}
        self.rounds = int(state["rounds"])
        self.round_steps = {}
