"""pytest set-up for the attack-cost benchmarks; the knobs are in workloads.py."""

from __future__ import annotations

import pytest
import torch
from workloads import BATCH, QUICK, ROUNDS, ROUNDS_PGD40, WARMUP


@pytest.fixture(scope="session")
def registry():
    from testbed.pluginmanager import build_host

    return build_host(autoload=False).registry


def pytest_report_header(config):
    mode = "QUICK (tiny shapes)" if QUICK else "full"
    return (
        f"attack benchmarks: {mode}, batch {BATCH}, rounds {ROUNDS} (PGD-40: {ROUNDS_PGD40}), "
        f"warm-up {WARMUP}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
