"""The ServerApp for Flower's deployment engine: one SuperLink, one SuperNode per site.

Run config (``flwr run ... --run-config``): ``scenario`` (path to the TOML, required),
``out`` (run folder; default under the scenario's report.out_dir), ``data-root``,
``plugins`` (comma-separated plugin modules), ``set`` (``;``-separated KEY=VALUE
overrides). Each site's SuperNode needs ``partition-id`` (its client index) in its node
config and may set its own ``data-root``. See docs/flower.md and scripts/flower_loopback.sh.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from testbed.flower.strategy import FlowerEngine
from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario

log = logging.getLogger("flwr")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from testbed.data import DatasetError
    from testbed.pluginmanager import PluginError
    from testbed.problems import ScenarioError
    from testbed.rundir import RunError

    try:
        _run(grid, context)
    except (ScenarioError, RunError, PluginError, DatasetError) as exc:
        log.error("testbed: %s", exc)  # the one line a user needs, in `flwr log`
        raise


def _run(grid: Grid, context: Context) -> None:
    from testbed.runner import run_scenario

    cfg = context.run_config
    modules = [m for m in str(cfg.get("plugins", "")).split(",") if m.strip()]
    host = build_host(extra_modules=modules)
    overrides = [s for s in str(cfg.get("set", "")).split(";") if s.strip()]
    scenario = load_scenario(str(cfg["scenario"]), host.registry, overrides)
    if scenario.engine.name != "flower":  # another engine's params do not apply here
        params = host.registry["engines"].components["flower"].params()
        engine = {"name": "flower", "params": params.model_dump(mode="json")}
        scenario = scenario.model_copy(update={"engine": scenario.engine.model_copy(update=engine)})
    out = Path(str(cfg["out"])) if cfg.get("out") else None
    data_root = Path(str(cfg["data-root"])) if cfg.get("data-root") else None
    result = run_scenario(
        scenario,
        host,
        data_root=data_root,
        out=out,
        console=Console(stderr=True),
        show_progress=False,
        engine=FlowerEngine(grid, scenario.engine.timeout_s),
    )
    log.info("testbed: report written to %s", result.run_dir)
