"""The robustness-evaluation part of the report (issue 13): robust accuracy per client,
the ASR by direction with each attack's perceptibility, and Carlini et al.'s sanity checks,
each flag shown as possible gradient masking. From metrics.json alone; runs from before
these figures existed simply get no such tables."""

from __future__ import annotations

import math
import statistics
from typing import Any

from testbed.report import WIDE, TableData, _num, pct


def robust_cell(repeat: dict[str, Any]) -> str:
    """One seed's robust accuracy (mean over clients) for the accuracy table."""
    rob = repeat.get("robustness", {}).get("robust_accuracy")
    return pct(rob["mean"]) if rob and rob.get("attacks") else "n/a"


def _seed_mean(repeats: list[dict[str, Any]], label: str, get) -> float:
    vals = [_num(get(r["attacks"][label])) for r in repeats if label in r["attacks"]]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def robust_table(title: str, repeats: list[dict[str, Any]]) -> list[TableData]:
    rob = [r["robustness"]["robust_accuracy"] for r in repeats if "robustness" in r]
    if not rob or not rob[0]["attacks"]:
        return []
    clients = sorted(rob[0]["per_client"], key=int)
    wide = len(clients) > WIDE
    t = TableData(
        f"{title}: robust accuracy per client (own attacked images, every bounded attack)",
        ["seed", *(["min", "median", "max"] if wide else [f"client {c}" for c in clients]), "mean"],
    )
    for r, ra in zip((r for r in repeats if "robustness" in r), rob, strict=True):
        values = [_num(ra["per_client"][c]) for c in clients]
        cells = (
            [pct(min(values)), pct(statistics.median(values)), pct(max(values))]
            if wide
            else [pct(v) for v in values]
        )
        t.rows.append([str(r["seed"]), *cells, pct(ra["mean"])])
    t.notes.append("an image counts when every attack below leaves it correctly classified")
    t.notes.append("attacks: " + ", ".join(rob[0]["attacks"]))
    if rob[0]["excluded"]:
        t.notes.append(
            "not counted (no budget, or the unbounded check): " + ", ".join(rob[0]["excluded"])
        )
    return [t]


def direction_table(title: str, repeats: list[dict[str, Any]]) -> list[TableData]:
    first = repeats[0]["attacks"]
    labels = [k for k, a in first.items() if a.get("direction") and a.get("perceptibility")]
    if not labels:
        return []
    healthy = first[labels[0]]["healthy_class"]["name"]
    t = TableData(
        f"{title}: ASR by direction and perceptibility, mean over seeds",
        [
            "attack",
            *("missed dx own", "missed dx benign", "false alarm own", "false alarm benign"),
            *("target hit own", "L2 mean", "L-inf max", "SSIM mean", "PSNR mean"),
        ],
    )
    for label in labels:
        tsr = "-"
        if first[label].get("tsr"):

            def own_tsr(a: dict[str, Any]) -> float:
                cells = [a["tsr"][i][adv] for i, adv in enumerate(a["adversaries"])]
                vals = [_num(c) for c in cells if not math.isnan(_num(c))]
                return sum(vals) / len(vals) if vals else math.nan

            tsr = pct(_seed_mean(repeats, label, own_tsr))

        def d(key: str, label: str = label) -> str:
            return pct(_seed_mean(repeats, label, lambda a: a["direction"][key]))

        def p(key: str, label: str = label) -> float:
            return _seed_mean(repeats, label, lambda a: a["perceptibility"][key])

        t.rows.append(
            [
                label,
                d("lesion_to_healthy_own"),
                d("lesion_to_healthy_benign"),
                d("healthy_to_lesion_own"),
                d("healthy_to_lesion_benign"),
                tsr,
                _fmt(p("l2_mean")),
                _fmt(p("linf_max")),
                _fmt(p("ssim_mean")),
                _fmt(p("psnr_mean"), 1) + " dB",
            ]
        )
    t.notes.append(
        f"missed dx: images predicted as a lesion moved to {healthy}; false alarm: images "
        f"predicted {healthy} moved to a lesion class"
    )
    for label in labels:
        for note in first[label].get("notes") or []:
            t.notes.append(f"{label}: {note}")
    return [t]


def sanity_table(title: str, repeats: list[dict[str, Any]]) -> list[TableData]:
    checks = [r["robustness"]["sanity"] for r in repeats if "robustness" in r]
    ran = {
        k: sum(c["checks_run"].get(k, 0) for c in checks) for c in checks for k in c["checks_run"]
    }
    if not ran:
        return []
    flags = [
        (r["seed"], f)
        for r in repeats
        if "robustness" in r
        for f in r["robustness"]["sanity"]["flags"]
    ]
    if not flags:
        t = TableData(
            f"{title}: sanity checks (Carlini et al. 2019): all passed",
            ["check", "comparisons"],
            [[k, str(v)] for k, v in ran.items()],
        )
        return [t]
    t = TableData(
        f"{title}: sanity checks (Carlini et al. 2019): {len(flags)} violation(s), "
        "POSSIBLE GRADIENT MASKING",
        ["seed", "check", "attacks", "detail"],
    )
    for seed, f in flags:
        t.rows.append([str(seed), f["check"], ", ".join(f["attacks"]), f["detail"]])
    t.notes.append("comparisons: " + ", ".join(f"{k} {v}" for k, v in ran.items()))
    t.notes.append("a stronger or adaptive attack may find what these attacks missed")
    return [t]


def outsider_table(title: str, repeats: list[dict[str, Any]]) -> list[TableData]:
    with_outsider = [r for r in repeats if r.get("outsider")]
    if not with_outsider:
        return []
    t = TableData(
        f"{title}: outsider (surrogate trained on its own data only) beside the insider, "
        "mean over seeds",
        ["attack", "insider ASR benign", "outsider ASR, all models", "outsider ASR surrogate"],
    )

    def mean_of(values: list[float]) -> float:
        vals = [v for v in values if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    for label in with_outsider[0]["outsider"]:
        insider = mean_of([_num(r["attacks"][label]["aasr_benign"]) for r in with_outsider])
        outside = mean_of([_num(r["outsider"][label]["aasr"]) for r in with_outsider])
        on_surrogate = mean_of(
            [_num(v) for r in with_outsider for v in r["outsider"][label]["asr_crafting"] or []]
        )
        t.rows.append([label, pct(insider), pct(outside), pct(on_surrogate)])
    acc = [
        _num(v)
        for r in with_outsider
        for v in next(iter(r["outsider"].values()))["surrogate_acc"].values()
    ]
    t.notes.append(f"surrogates' accuracy on their owners' test splits: {pct(mean_of(acc))}")
    t.notes.append("outsider ASR over every client's federated model, the adversary's included")
    return [t]


def robustness_tables(title: str, task: dict[str, Any]) -> list[TableData]:
    repeats = task["repeats"]
    return (
        robust_table(title, repeats)
        + direction_table(title, repeats)
        + sanity_table(title, repeats)
        + outsider_table(title, repeats)
    )
