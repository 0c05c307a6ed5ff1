"""Attack sweeps: one `[[attacks]]` entry with `sweep = { eps = [...] }` becomes one attack
per grid point, each validated as if written out by hand.

Expansion happens while a scenario is validated, so the resolved scenario (and every
report) lists the individual attacks; each keeps `sweep_of` (the entry's label) and
`sweep_point` (its values) for the figures. Attack sweeps never retrain: training does
not depend on attacks, and the federation cache is keyed on training inputs only.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from pydantic import ValidationError

from testbed.problems import unknown_key_message
from testbed.registry import Registry

MAX_ATTACKS = 10_000
"""Most attacks a scenario may expand to, over all its sweeps: each is crafted against
every client, so even this many is days of work; more is a typo (or an attack on the
validator), refused before one grid point is built."""
MAX_POINT_PROBLEMS = 5
"""Invalid grid points reported per sweep; the rest are counted, not listed."""


def _label(raw: dict[str, Any], swept: set[str]) -> str:
    if raw.get("label"):
        return str(raw["label"])
    steps = raw.get("params", {}).get("max_iter") if "max_iter" not in swept else None
    return str(raw["name"]).upper() + (f"-{steps}" if steps else "")


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand_attack_sweeps(doc: dict[str, Any], registry: Registry) -> list[tuple[str, str]]:
    """Replace swept entries of doc["attacks"] in place; returns (path, message) problems."""
    attacks = doc.get("attacks")
    if not isinstance(attacks, list) or not any(
        isinstance(a, dict) and "sweep" in a for a in attacks
    ):
        return []
    problems: list[tuple[str, str]] = []
    sizes = [_grid_size(a["sweep"]) if isinstance(a, dict) and "sweep" in a else 1 for a in attacks]
    if sum(sizes) > MAX_ATTACKS:
        return [("attacks", f"the sweeps expand to {sum(sizes)} attacks; at most {MAX_ATTACKS}")]
    expanded: list[Any] = []
    for i, raw in enumerate(attacks):
        if not isinstance(raw, dict) or "sweep" not in raw:
            expanded.append(raw)
            continue
        where = f"attacks[{i}].sweep"
        sweep = raw["sweep"]
        if not isinstance(sweep, dict) or not sweep:
            problems.append((where, "must be a table of parameter = [values]"))
            continue
        bad = [k for k, v in sweep.items() if not isinstance(v, list) or not v]
        if bad:
            problems += [(f"{where}.{k}", "must be a non-empty list of values") for k in bad]
            continue
        comp = registry["attacks"].components.get(raw.get("name"))  # type: ignore[arg-type]
        if comp is None:
            expanded.append({k: v for k, v in raw.items() if k != "sweep"})
            continue  # the component pass reports the unknown name
        base = {k: v for k, v in raw.items() if k != "sweep"}
        params = base.get("params", {}) if isinstance(base.get("params", {}), dict) else {}
        base_label = _label(base, set(sweep))
        keys = list(sweep)
        bad_points = 0
        for values in itertools.product(*(sweep[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            try:
                comp.params.model_validate({**params, **point})
            except ValidationError as exc:
                bad_points += 1
                if bad_points > MAX_POINT_PROBLEMS:
                    continue  # counted below: thousands of lines would hide the cause
                for err in exc.errors(include_url=False):
                    loc = ".".join(str(p) for p in err["loc"])
                    at = f"{where}.{loc}" if loc in point else f"attacks[{i}].params.{loc}"
                    msg = err["msg"].removeprefix("Value error, ")
                    if err["type"] == "extra_forbidden":
                        msg = unknown_key_message(comp.params, tuple(err["loc"]))
                    problems.append((at, f"{msg} (at {_point(point)})"))
                continue
            expanded.append(
                {
                    **base,
                    "params": {**params, **point},
                    "label": f"{base_label} {_point(point)}",
                    "sweep_of": base_label,
                    "sweep_point": point,
                }
            )
        if bad_points > MAX_POINT_PROBLEMS:
            more = bad_points - MAX_POINT_PROBLEMS
            problems.append((where, f"{more} more invalid grid points (of {sizes[i]})"))
    if not problems:
        doc["attacks"] = expanded
    return problems


def _grid_size(sweep: Any) -> int:
    """Points of a sweep's grid, from the list lengths alone (nothing is expanded)."""
    if not isinstance(sweep, dict):
        return 1
    return math.prod(len(v) if isinstance(v, list) else 1 for v in sweep.values())


def _point(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in point.items())
