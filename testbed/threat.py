"""Which clients are compromised: the `[threat_model]` rules that the scenario checks and
the engine follows.

A scenario names the compromised clients (``malicious = [ids]``) or a share of them
(``malicious_fraction``); a share is drawn once per seed from its own generator, so every
repeat has its own compromised set, the same on every engine and after ``--resume``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from testbed.state import generator

if TYPE_CHECKING:
    from testbed.scenario import ThreatModel


def n_malicious(tm: ThreatModel, n_clients: int) -> int:
    """How many clients are compromised (0 when none are named)."""
    if tm.malicious is not None:
        return len(tm.malicious)
    if tm.malicious_fraction is not None:
        return round(tm.malicious_fraction * n_clients)
    return 0


def threat_problems(tm: ThreatModel, n_clients: int, poisoning: bool) -> list[str]:
    """What is wrong with the compromised set for a federation of ``n_clients``."""
    if tm.malicious is not None:
        if len(tm.malicious) > n_clients:
            return [
                f"threat_model.malicious names {len(tm.malicious)} compromised clients, more "
                f"than the {n_clients} clients"
            ]
        bad = [a for a in tm.malicious if not 0 <= a < n_clients]
        if bad:
            return [f"threat_model.malicious {bad} out of range 0..{n_clients - 1}"]
        if len(set(tm.malicious)) != len(tm.malicious):
            return [f"threat_model.malicious {tm.malicious} names a client twice"]
    k = n_malicious(tm, n_clients)
    if tm.malicious_fraction is not None and k < 1:
        return [
            f"threat_model.malicious_fraction {tm.malicious_fraction} of {n_clients} clients "
            "gives round(f * N) = 0 compromised clients"
        ]
    if poisoning and k >= n_clients:  # every poisoning verdict reads the honest models
        return [
            f"[[poisoning]] with all {n_clients} clients compromised leaves no benign client, "
            "and the poisoning metrics are measured on the benign clients' models: "
            "compromise fewer"
        ]
    if k == 0 and (poisoning or tm.adversaries == "malicious"):
        what = "[[poisoning]]" if poisoning else "threat_model.adversaries = 'malicious'"
        return [f"{what} needs threat_model.malicious or malicious_fraction"]
    return []


def malicious_clients(tm: ThreatModel, n_clients: int, seed: int) -> tuple[int, ...]:
    """The compromised clients of a run with this seed, sorted."""
    if tm.malicious is not None:
        return tuple(sorted(tm.malicious))
    k = n_malicious(tm, n_clients)
    if k == 0:
        return ()
    perm = torch.randperm(n_clients, generator=generator(seed, "malicious"))
    return tuple(sorted(perm[:k].tolist()))
