"""The paper's reported figures (Darzi et al., Tables I and II; SPEC.md), for side-by-side
reports. They are reference data to compare against, not expectations of our code."""

from __future__ import annotations

from typing import Any

TABLE_I = {  # task: (ACC, AASR PGD-20, AASR PGD-40, s per PGD-20 batch, s per PGD-40 batch)
    "meningioma": (0.8412, 0.2752, 0.3299, 3.423, 6.794),
    "pathology": (0.7701, 0.6098, 0.8227, 5.464, 10.843),
    "glioma": (0.6184, 0.5183, 0.6377, 3.420, 6.793),
}
TABLE_II = {  # task: (AETR FGSM, AETR PGD)
    "meningioma": (0.8480, 0.8373),
    "glioma": (0.8232, 0.7489),
    "pathology": (0.9067, 0.7986),
}


def find_attack(attacks: dict[str, Any], name: str, **params: float) -> str | None:
    """The label of the first attack with this name and these parameter values."""
    for label, a in attacks.items():
        p = a["params"]
        if a["attack"] == name and all(abs(p.get(k, -1) - v) < 1e-9 for k, v in params.items()):
            return label
    return None


PAPER_ATTACKS = {  # the paper's table columns: attack and its parameters (Sec. V)
    "FGSM": ("fgsm", {"eps": 0.03}),
    "PGD-20": ("pgd", {"eps": 0.03, "eps_step": 0.007, "max_iter": 20}),
    "PGD-40": ("pgd", {"eps": 0.03, "eps_step": 0.007, "max_iter": 40}),
}


def paper_attack_labels(attacks: dict[str, Any]) -> dict[str, str | None]:
    """Our attacks that match the paper's table columns (eps 0.03, alpha 0.007)."""
    return {col: find_attack(attacks, name, **p) for col, (name, p) in PAPER_ATTACKS.items()}
