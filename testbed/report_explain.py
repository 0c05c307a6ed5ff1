"""The report's section on explanations (``[explain]``, testbed/explain.py), from
metrics.json alone: per attack, method and model, how far the attribution moved (rank
correlation, top-k overlap) and whether a detector reading one input's attributions tells
adversarial from clean inputs (AUROC); a sentence names every case where it does not."""

from __future__ import annotations

import math
from typing import Any

from testbed.report import TableData, _num

ROLE_NAMES = {"own": "adversary's own", "benign": "benign"}


def chance_band(images: int, seeds: int = 1) -> float:
    """Two standard deviations of the AUROC of a score unrelated to the labels, for
    ``images`` clean and ``images`` adversarial inputs (Mann-Whitney: var = (n1 + n2 + 1)
    / (12 n1 n2)), averaged over ``seeds``: an AUROC within 0.5 +- this is chance."""
    n = images
    return 2 * math.sqrt((2 * n + 1) / (12 * n * n)) / math.sqrt(max(1, seeds))


def _pct0(v: float | None) -> str:
    v = _num(v)
    return "n/a" if math.isnan(v) else f"{100 * v:.0f}%"


def _cell(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or math.isnan(_num(stat.get("mean"))):
        return "n/a"
    s = f"{_num(stat['mean']):.{digits}f}"
    return s + (f" ± {_num(stat['std']):.{digits}f}" if stat.get("n", 1) > 1 else "")


def explain_tables(title: str, task: dict[str, Any]) -> list[TableData]:
    """Empty for a run without ``[explain]``."""
    from testbed.explain import summarise_explain

    repeats = task["repeats"]
    summary = task["summary"].get("explain") or summarise_explain(repeats)
    if not summary:
        return []
    first_label = next(iter(summary))
    info = repeats[0]["attacks"][first_label]["explain"]
    seeds = sum(1 for r in repeats if r["attacks"][first_label].get("explain"))
    band = chance_band(info["images"], seeds)
    t = TableData(
        f"{title}: explanations of the attacked images, mean over {seeds} seed(s)",
        ["attack", "method", "model", "rank corr", "top-k overlap", "detector AUROC", "flipped"],
    )
    no_help: dict[str, list[str]] = {}
    for label, per_method in summary.items():
        rows = [
            r["attacks"][label]["explain"] for r in repeats if r["attacks"][label].get("explain")
        ]
        for method, per_role in per_method.items():
            for role, stats in per_role.items():
                flipped = [_num(row["predictions"][role]["flipped"]) for row in rows]
                client = rows[0]["models"][role]
                t.rows.append(
                    [
                        label,
                        method,
                        f"{role} (client {client})",
                        _cell(stats["rank_corr"]),
                        _cell(stats["top_k_overlap"]),
                        _cell(stats["auroc"]),
                        _pct0(sum(flipped) / len(flipped)),
                    ]
                )
                auroc = _num(stats["auroc"]["mean"])
                if not auroc > 0.5 + band:
                    no_help.setdefault(label, []).append(
                        f"{method} on the {ROLE_NAMES.get(role, role)} model "
                        f"({'n/a' if math.isnan(auroc) else f'{auroc:.2f}'})"
                    )
    n = info["images"]
    t.notes.append(
        f"{n} images of adversary {info['models']['own']} per attack and seed, each clean and "
        f"adversarial; every map explains the class predicted for that input. rank corr: "
        f"Spearman over pixels, clean vs adversarial map of the same image (1: same "
        f"ranking); top-k overlap: share of the clean map's k = {info['k']} most attributed "
        f"pixels ({100 * info['top_k_share']:g}% of the image) among the adversarial map's; "
        f"flipped: share of those images whose prediction the attack changed on that model"
    )
    t.notes.append(
        f"detector: {info['detector']}; it sees one input, never its clean version. AUROC "
        f"0.5 is chance: within 0.5 ± {band:.2f} (2 sd of a random score's AUROC for {n} + "
        f"{n} inputs{f', mean of {seeds} seeds' if seeds > 1 else ''}) explanations do not "
        "tell adversarial from clean inputs"
    )
    gaps = [
        g
        for label in summary
        for r in repeats
        if (e := r["attacks"][label].get("explain"))
        for per_role in [e["per_method"].get("integrated_gradients", {})]
        for stats in per_role.values()
        if (g := stats.get("ig_completeness_gap")) is not None
    ]
    if gaps:
        t.notes.append(
            f"integrated gradients: {info['ig_steps']} steps from a black image; completeness "
            f"gap |sum of attributions - (f(x) - f(0))| / |f(x) - f(0)| {min(gaps):.2f} to "
            f"{max(gaps):.2f} (0 for the exact integral; more ig_steps lower it)"
        )
    for label, cases in no_help.items():
        t.notes.append(
            f"Explanations do not help against {label}: the detector's AUROC is within chance "
            f"(0.5 ± {band:.2f}) with {'; '.join(cases)}"
        )
    return [t]
