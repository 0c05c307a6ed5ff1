"""Class floors: what always answering a split's commonest class scores, and the warning a
report gives when a client's model scores no higher. On the paper's label-sorted non-IID
partition a client's test split can be 95% one class, so an accuracy there proves nothing
until it beats that floor."""

from __future__ import annotations

from typing import Any

from testbed.report import _num, pct


def class_floor(counts: list[int]) -> float:
    """What always answering the commonest class scores on a split with these counts."""
    return max(counts) / sum(counts)


def at_class_floor(acc: float, counts: list[int]) -> bool:
    """Whether ``acc`` is no higher than the split's class floor, within half an image
    (float32 accuracies against this ratio)."""
    return acc <= class_floor(counts) + 0.5 / sum(counts)


def class_floor_warnings(repeats: list[dict[str, Any]]) -> list[str]:
    """A warning when a client's model scores no higher than always answering the commonest
    class of its own test split: on a label-sorted non-IID split that floor reaches 95-100%
    (paper_baseline's partition), and such an accuracy does not show the model learned.

    Each flagged model's balanced accuracy comes with it, where the run recorded one: a
    model under its floor may still have learned both classes (all 9 images of the rare
    class right, say), and only the balanced figure, against 1/k for one constant answer,
    tells that model from one that always gives the same answer."""
    hits: list[str] = []
    chance: set[int] = set()  # 1/k for one constant answer, k = classes in the split
    total = 0
    for r in repeats:
        balanced = r.get("acc_balanced") or {}  # absent in runs from before it was recorded
        for c in r.get("clients", []):
            counts = c.get("test_label_counts")  # likewise
            if not counts or not sum(counts):
                continue
            total += 1
            cid = str(c["id"])
            acc = _num(r["acc"].get(cid))
            if at_class_floor(acc, counts):
                hit = f"seed {r['seed']} client {cid} {pct(acc)} against {pct(class_floor(counts))}"
                if cid in balanced:
                    hit += f", balanced {pct(balanced[cid])}"
                    chance.add(sum(1 for n in counts if n))
                hits.append(hit)
    if not hits:
        return []
    shown = "; ".join(hits[:4]) + (f"; {len(hits) - 4} more" if len(hits) > 4 else "")
    why = "their accuracy does not show that they learned the task"
    if chance:
        constant = pct(1 / min(chance)) if len(chance) == 1 else "1/k on k classes"
        why += f"; balanced accuracy tells which did (a constant answer scores {constant})"
    return [
        f"{len(hits)} of {total} client models score no higher than always "
        f"answering their test split's commonest class ({shown}): {why}"
    ]
