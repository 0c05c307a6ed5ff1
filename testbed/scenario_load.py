"""Scenario files: TOML validated by pydantic, every problem reported at once.

Validation runs in two passes over the same document: the fixed schema (testbed/scenario.py),
then each component's own params model looked up by name in the plugin registry. Both
passes run even when the other fails, so `testbed validate` lists everything wrong with a
file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from testbed.problems import (
    TOO_DEEP,
    Problem,
    ScenarioError,
    apply_overrides,
    parse_document,
    pydantic_problems,
    too_deep,
)
from testbed.registry import Registry, singular
from testbed.scenario import SECTION_KINDS, Scenario
from testbed.sweep import expand_attack_sweeps


def _raw_components(doc: dict[str, Any]) -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = []
    tasks = doc.get("tasks")
    if isinstance(tasks, list):
        out += [
            (f"tasks[{i}].data", "datasets", t.get("data"))
            for i, t in enumerate(tasks)
            if isinstance(t, dict)
        ]
    for section, kind in SECTION_KINDS.items():
        value = doc.get(section)
        if isinstance(value, list):
            out += [(f"{section}[{i}]", kind, v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            out.append((section, kind, value))
    return out


_DEFAULT_NAMES = {"partition": "noniid_chunks", "model": "paper_cnn", "aggregator": "fedavg"}


def _fill_component_defaults(doc: dict[str, Any]) -> None:
    for section, name in _DEFAULT_NAMES.items():
        doc.setdefault(section, {})
        if isinstance(doc[section], dict):
            doc[section].setdefault("name", name)
    # the engine too, so that its params are always resolved: a scenario without [engine]
    # and its own scenario.json read back (--resume) must be the same scenario
    engine = doc.setdefault("engine", {})
    if isinstance(engine, str):
        doc["engine"] = {"name": engine}
    elif isinstance(engine, dict):
        engine.setdefault("name", "inprocess")


def _check_components(file: str, doc: dict[str, Any], registry: Registry) -> list[Problem]:
    problems = []
    for where, kind, raw in _raw_components(doc):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            continue  # the schema pass reports the shape problem
        kreg = registry[kind]
        name = raw["name"]
        if name not in kreg.components:
            known = ", ".join(kreg.names()) or "none installed"
            msg = f"unknown {singular(kind)} {name!r} (known: {known})"
            problems.append(Problem(file, f"{where}.name", msg))
            continue
        params = raw.get("params", {})
        if not isinstance(params, dict):
            continue
        try:
            resolved = kreg.components[name].params.model_validate(params)
        except ValidationError as exc:
            problems += pydantic_problems(
                file, exc, f"{where}.params", kreg.components[name].params
            )
        else:
            raw["params"] = resolved.model_dump(mode="json")
    return problems


def validate_document(doc: dict[str, Any], registry: Registry, file: str) -> Scenario:
    if too_deep(doc):  # --set values and documents built in code are not parsed here
        raise ScenarioError([Problem(file, "", TOO_DEEP)])
    doc = json.loads(json.dumps(doc))  # a private copy; the component pass fills in params
    _fill_component_defaults(doc)
    problems = [Problem(file, w, m) for w, m in expand_attack_sweeps(doc, registry)]
    problems += _check_components(file, doc, registry)
    try:
        scenario = Scenario.model_validate(doc)
    except ValidationError as exc:
        problems = pydantic_problems(file, exc, model=Scenario) + problems
        scenario = None
    if scenario is not None and not problems:
        problems = _check_against_scenario(file, scenario, registry)
    if problems or scenario is None:
        raise ScenarioError(problems)
    return scenario


def _check_against_scenario(file: str, scenario: Scenario, registry: Registry) -> list[Problem]:
    problems = []
    engines = registry["engines"]
    if scenario.engine.name not in engines.components:
        known = ", ".join(engines.names()) or "none installed"
        msg = f"unknown engine {scenario.engine.name!r} (known: {known})"
        problems.append(Problem(file, "engine.name", msg))
    for where, kind, spec in scenario.components():
        comp = registry[kind].components.get(spec.name)  # None: the unknown engine above
        if comp is not None and comp.check is not None:
            params = comp.params.model_validate(spec.params)
            problems += [
                Problem(file, f"{where}.params", msg) for msg in comp.check(params, scenario)
            ]
    return problems


def load_scenario(
    path: Path | str,
    registry: Registry,
    overrides: list[str] | None = None,
    *,
    seed: int | None = None,
    repeats: int | None = None,
) -> Scenario:
    """The validated scenario of ``path`` after ``--set`` overrides; ``seed`` and
    ``repeats`` (the CLI's --seed, --repeats) replace the file's seeds and are validated
    like values written in the file."""
    path = Path(path)
    doc = parse_document(path)
    overrides = list(overrides or [])
    if seed is not None:
        overrides.append(f"scenario.seed={seed}")
    if repeats is not None:
        overrides.append(f"evaluation.repeats={repeats}")
    if (seed is not None or repeats is not None) and isinstance(doc.get("evaluation"), dict):
        doc["evaluation"].pop("seeds", None)  # explicit seeds would contradict the new ones
    if overrides:
        apply_overrides(doc, overrides, str(path))
    return validate_document(doc, registry, str(path))
