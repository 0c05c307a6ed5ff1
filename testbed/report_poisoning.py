"""The report's section on training-time attacks, from metrics.json alone: what the
compromised clients achieved (backdoor success, targeted error), what the benign ones
kept (clean accuracy), and what the defence caught (the detection matrix)."""

from __future__ import annotations

from typing import Any

from testbed.report import TableData, _stat_pct, pct

MAX_ROUND_ROWS = 20
"""Per-round detection rows shown; all rounds are in metrics.json."""


def _rate(block: dict[str, Any] | None, who: str) -> str:
    return pct(block[who]) if block else "-"


def _caught(dropped: int, total: int) -> str:
    return f"{dropped}/{total}" + (f" ({100 * dropped / total:.0f}%)" if total else "")


def poisoning_tables(title: str, task: dict[str, Any]) -> list[TableData]:
    """Empty for a run without ``[[poisoning]]``."""
    repeats = [r for r in task["repeats"] if r.get("poisoning")]
    if not repeats:
        return []
    first = repeats[0]["poisoning"]
    who = "colluding " if first["collude"] else ""
    t = TableData(
        f"{title}: training-time attacks ({', '.join(first['attacks'])}) by {who}clients "
        f"{first['malicious']}",
        [
            "seed",
            "compromised",
            "ACC benign",
            "backdoor benign",
            "untriggered benign",
            "backdoor compr.",
            "targeted benign",
            "compr. dropped",
            "benign dropped",
        ],
    )
    for r in repeats:
        p = r["poisoning"]
        det = p["detection"]
        t.rows.append(
            [
                str(r["seed"]),
                ", ".join(map(str, p["malicious"])),
                pct(p["acc_benign"]),
                _rate(p.get("backdoor_success"), "benign"),
                _rate((p.get("backdoor_success") or {}).get("untriggered"), "benign"),
                _rate(p.get("backdoor_success"), "malicious"),
                _rate(p.get("targeted_error"), "benign"),
                _caught(det["malicious_dropped"], det["malicious"]),
                _caught(det["benign_dropped"], det["benign"]),
            ]
        )
    summ = task["summary"].get("poisoning") or {}
    notes = [
        "backdoor: share of triggered test images of other classes classified as the target; "
        "untriggered: the same images without the trigger (the floor the backdoor sits on); "
        "targeted: share of test images classified as the label the attack taught for "
        "their class; dropped: uploads dropped by screening, a defence or the aggregator",
        f"mean clean ACC of benign clients {_stat_pct(summ.get('acc_benign'))}",
    ]
    if "backdoor_success" in summ:
        bd = summ["backdoor_success"]
        floor = (
            f"; without the trigger {_stat_pct(bd['untriggered']['benign'])}"
            if "untriggered" in bd  # runs before it was measured lack it
            else ""
        )
        notes.append(
            f"backdoor success on benign models {_stat_pct(bd['benign'])}"
            f" (target class {first['backdoor_success']['target']}, final models{floor})"
        )
    if "targeted_error" in summ:
        notes.append(
            f"targeted error on benign models {_stat_pct(summ['targeted_error']['benign'])}"
        )
    notes += [f"warning: {w}" for w in summ.get("warnings", [])]
    t.notes += notes
    out = [t]

    rounds = [rec for rec in repeats[0]["rounds"] if "detection" in rec]
    if any(rec["detection"]["malicious_dropped"] or rec["detection"]["benign_dropped"]
           for rec in rounds):  # fmt: skip
        d = TableData(
            f"{title}: detection per round, seed {repeats[0]['seed']}",
            ["round", "compromised sampled", "compromised dropped", "benign dropped"],
        )
        for rec in rounds[:MAX_ROUND_ROWS]:
            det = rec["detection"]
            d.rows.append(
                [
                    str(rec["round"]),
                    ", ".join(map(str, rec["malicious"])) or "-",
                    _caught(det["malicious_dropped"], det["malicious"]),
                    _caught(det["benign_dropped"], det["benign"]),
                ]
            )
        if len(rounds) > MAX_ROUND_ROWS:
            d.notes.append(f"{len(rounds) - MAX_ROUND_ROWS} more rounds in metrics.json")
        out.append(d)
    return out
