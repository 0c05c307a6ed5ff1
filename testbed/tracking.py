"""Optional MLflow logging of finished runs and comparisons (`--mlflow [URI]`).

One MLflow run per scenario, named after it: the resolved scenario (scenario.json) as
flattened params, the summary over seeds as metrics, report.md, report.html, metrics.json,
scenario.json and every figure as artifacts. Under it, one nested run per task and seed:
per-round metrics (step = round: mean and per-client training loss and update norm, the
mechanism's running epsilon, seconds) and the final metrics (clean ACC per client, each
attack's scalar results, robust accuracy, privacy spent). A
comparison is one more level: a parent run with the comparison's table and figures, each
scenario's run nested under it.

Logged from the finished run folder only, after the run: a tracking problem never costs a
run. The experiment is $MLFLOW_EXPERIMENT_NAME, else "testbed". Needs the `mlflow` extra
(mlflow-skinny).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any

DEFAULT_URI = "./mlruns"
EXPERIMENT = "testbed"
MAX_PARAM_VALUE = 500
"""MLflow stores at least this many characters of a param value in every backend."""
INSTALL_HINT = "pip install -e '.[mlflow]'"

_KEY_OK = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackingError(Exception):
    """MLflow is missing, or its store refuses the logging; one line."""


def missing() -> str | None:
    """The one-line problem when mlflow is not installed, else None."""
    if importlib.util.find_spec("mlflow") is None:
        return f"--mlflow needs MLflow: {INSTALL_HINT} (mlflow-skinny)"
    return None


def tracking_uri(uri: str) -> str:
    """A URI as MLflow takes it: a plain path becomes an absolute file: URI."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def key(name: str) -> str:
    """A metric or param key MLflow accepts (letters, digits, _ - . space /)."""
    return re.sub(r"\.{2,}", "_", _KEY_OK.sub("_", name))[:250]


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys; lists as JSON; each value cut to MAX_PARAM_VALUE."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        # lists of tables (tasks, attacks, defences): one key per entry, by position
        if obj and all(isinstance(v, dict) for v in obj):
            for i, v in enumerate(obj):
                out.update(flatten(v, f"{prefix}.{i}"))
            return out
        text = json.dumps(obj)
    else:
        text = "" if obj is None else str(obj) if not isinstance(obj, bool) else str(obj).lower()
    out[key(prefix)] = text[:MAX_PARAM_VALUE]
    return out


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def scalar_metrics(obj: Any, prefix: str, depth: int = 0) -> dict[str, float]:
    """Every finite number in nested dicts (lists are skipped: matrices, per image)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict) and depth < 6:
        for k, v in obj.items():
            out.update(scalar_metrics(v, f"{prefix}/{k}" if prefix else str(k), depth + 1))
    elif (f := _finite(obj)) is not None:
        out[key(prefix)] = f
    return out


def _mean(values: dict[str, Any]) -> float | None:
    vals = [f for v in values.values() if (f := _finite(v)) is not None]
    return sum(vals) / len(vals) if vals else None


def round_metrics(rec: dict[str, Any], seconds: float | None) -> dict[str, float]:
    """One round's record as metrics at step = round."""
    out: dict[str, float] = {}
    for name in ("train_loss", "update_norm"):
        per_client = rec.get(name) or {}
        if (m := _mean(per_client)) is not None:  # a file store's keys are paths:
            out[f"round/{name}/mean"] = m  # no key may be the folder of another
        for c, v in per_client.items():
            if (f := _finite(v)) is not None:
                out[f"round/{name}/client {c}"] = f
    for k, v in rec.items():  # e.g. paper_dp: {epsilon, noise_std}
        per_client = all(str(c).isdigit() for c in v) if isinstance(v, dict) else True
        if isinstance(v, dict) and k not in ("train_loss", "update_norm") and not per_client:
            out.update(scalar_metrics(v, f"round/{k}"))
    out["round/sampled"] = float(len(rec.get("sampled", [])))
    out["round/events"] = float(len(rec.get("events", [])))
    if (s := _finite(seconds)) is not None:
        out["round/seconds"] = s
    return {key(k): v for k, v in out.items()}


def repeat_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """A seed's final metrics."""
    out: dict[str, float] = {}
    out.update(scalar_metrics(rep.get("acc", {}), "acc/client"))
    out.update(scalar_metrics(rep.get("acc_balanced", {}), "acc_balanced/client"))
    for name in ("acc_mean", "acc_balanced_mean"):
        if (f := _finite(rep.get(name))) is not None:
            out[name] = f
    for label, a in rep.get("attacks", {}).items():
        skip = {"asr", "per_image", "direction", "etr", "cost_s", "samples", "tsr"}
        out.update(scalar_metrics({k: v for k, v in a.items() if k not in skip},
                                  f"attack/{label}"))  # fmt: skip
        costs = [f for c in a.get("cost_s") or [] if (f := _finite(c)) is not None]
        if costs:
            out[key(f"attack/{label}/cost_s")] = sum(costs) / len(costs)
    rob = (rep.get("robustness") or {}).get("robust_accuracy") or {}
    if (f := _finite(rob.get("mean"))) is not None:
        out["robust_acc"] = f
    for p in rep.get("privacy", []):
        if (f := _finite(p.get("epsilon"))) is not None:
            out[key(f"privacy/{p.get('mechanism', 'dp')}/epsilon")] = f
    for name in ("poisoning", "outsider"):
        if rep.get(name):
            out.update(scalar_metrics(rep[name], name))
    return out


def summary_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The summary over seeds of every task: mean and std."""
    out: dict[str, float] = {}
    multi = len(metrics["tasks"]) > 1
    for name, task in metrics["tasks"].items():
        base = f"{name}/" if multi else ""
        out.update(scalar_metrics(task["summary"], base.rstrip("/")))
    out["total_s"] = float(_finite(metrics.get("timing", {}).get("total_s")) or 0.0)
    return {key(k): v for k, v in out.items()}


class Tracker:
    """An MLflow client on one store and experiment."""

    def __init__(self, uri: str) -> None:
        if problem := missing():
            raise TrackingError(problem)
        self.uri = tracking_uri(uri)
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store only on request; a local ./mlruns is the
            # store the issue asks for, and mlflow-skinny has no database backend.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._errors: tuple[type[BaseException], ...] = (MlflowException, OSError)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            exp = self.client.get_experiment_by_name(name)
            self.experiment_id = (
                exp.experiment_id if exp is not None else self.client.create_experiment(name)
            )
        except self._errors as exc:
            raise TrackingError(f"MLflow store {self.uri}: {_first_line(exc)}") from None

    # -- low level --------------------------------------------------------------------

    def _start(self, name: str, parent: str | None, tags: dict[str, str]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        tags = {MLFLOW_RUN_NAME: name, **tags}
        if parent:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def _params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def _artifacts(self, run_id: str, root: Path, files: list[Path]) -> None:
        for f in files:
            if f.is_file():
                sub = f.parent.relative_to(root).as_posix()
                self.client.log_artifact(run_id, str(f), None if sub == "." else sub)

    # -- what testbed logs ------------------------------------------------------------

    def log_run(self, run_dir: Path, metrics: dict[str, Any], parent: str | None = None) -> str:
        """The finished run folder: the scenario's run and one nested run per task and
        seed; returns the scenario run's id."""
        try:
            return self._log_run(run_dir, metrics, parent)
        except self._errors as exc:
            raise TrackingError(f"MLflow logging failed: {_first_line(exc)}") from None

    def _log_run(self, run_dir: Path, metrics: dict[str, Any], parent: str | None) -> str:
        from testbed.html_page import figure_files

        tags = {"testbed.version": str(metrics.get("testbed_version")),
                "testbed.run_dir": str(run_dir.resolve())}  # fmt: skip
        run_id = self._start(str(metrics["scenario"]), parent, tags)
        scenario = run_dir / "scenario.json"
        if scenario.is_file():
            self._params(run_id, flatten(json.loads(scenario.read_text())))
        self._metrics(run_id, summary_metrics(metrics))
        files = [run_dir / n for n in ("report.md", "report.html", "metrics.json",
                                        "scenario.json", "run.log")]  # fmt: skip
        self._artifacts(run_id, run_dir, files + figure_files(run_dir, metrics.get("plots", [])))
        for name, task in metrics["tasks"].items():
            for rep in task["repeats"]:
                child = self._start(
                    f"{name} seed {rep['seed']}", run_id,
                    {"testbed.task": name, "testbed.seed": str(rep["seed"])},
                )  # fmt: skip
                self._params(child, {"task": name, "seed": str(rep["seed"]),
                                     "dataset": str(task["dataset"]["name"])})  # fmt: skip
                times = rep.get("timing", {}).get("round_s") or []
                for i, rec in enumerate(rep.get("rounds", [])):
                    sec = times[i] if i < len(times) else None
                    self._metrics(child, round_metrics(rec, sec), step=int(rec.get("round", i + 1)))
                self._metrics(child, {key(k): v for k, v in repeat_metrics(rep).items()})
                self.client.set_terminated(child)
        self.client.set_terminated(run_id)
        return run_id

    def log_compare(
        self, out: Path, rows: list[dict[str, Any]], results: dict[str, dict[str, Any]]
    ) -> str:
        """A comparison: its own run (table metrics, files) with every scenario nested."""
        try:
            run_id = self._start(out.resolve().name, None, {"testbed.compare": str(out.resolve())})
            self._params(run_id, {"configurations": ", ".join(results)[:MAX_PARAM_VALUE]})
            values: dict[str, float] = {}
            for r in rows:
                values.update(scalar_metrics(
                    {"acc": r["acc"].get("mean"), "epsilon": r.get("epsilon"),
                     **{f"aasr/{k}": a["aasr"].get("mean") for k, a in r["attacks"].items()}},
                    f"{r['config']}",
                ))  # fmt: skip
            self._metrics(run_id, values)
            files = [
                p for p in sorted(out.iterdir()) if p.is_file() and not p.name.endswith(".tmp")
            ]
            self._artifacts(run_id, out, files)
            for name, metrics in results.items():
                self._log_run(out / name, metrics, run_id)
            self.client.set_terminated(run_id)
            return run_id
        except self._errors as exc:
            raise TrackingError(f"MLflow logging failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
