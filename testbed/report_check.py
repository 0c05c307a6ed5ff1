"""What `testbed report` needs from a metrics.json, checked before anything is rendered.

A metrics.json from a run is complete; one edited by hand, truncated by a tool or written
by another version may not be. The models below describe exactly what `report.render`
and `report.markdown` read (extra keys are allowed), so an incomplete file is one line
naming the missing key instead of a KeyError from the middle of a table.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.paper import TABLE_I, paper_attack_labels
from testbed.problems import pydantic_problems

Num = float | Literal["inf", "-inf", "nan"] | None
"""A number as metrics.json writes it: JSON has no inf/NaN, so they are strings or null."""
Rate = Annotated[float, Field(ge=0, le=1)] | Literal["nan"] | None
"""A share (accuracy, attack success): a tampered 1.5 would read as 150%; NaN is a
diverged model's."""


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Stat(Open):
    mean: Num
    std: Num = None
    n: int = 1


class RateStat(Stat):
    mean: Rate


class AttackRepeat(Open):
    adversaries: list[int]
    asr: list[list[Rate]]
    sweep_of: str | None = None
    attack: str
    params: dict[str, Any]


class Privacy(Open):
    mechanism: str
    accountant: Any
    delta: float
    rounds_accounted: Any
    clip_norm: float
    noise_multiplier: float


class Event(Open):
    round: Any
    client: int | None
    kind: str
    action: str
    detail: str


class Client(Open):
    id: int
    train: int = Field(ge=0)
    test: int = Field(ge=0)
    test_label_counts: list[Annotated[int, Field(ge=0)]] | None = None  # absent before it


class Repeat(Open):
    seed: int
    clients: list[Client] = Field(default_factory=list)
    acc: dict[str, Rate]
    acc_mean: Rate
    acc_balanced: dict[str, Rate] = Field(default_factory=dict)
    acc_balanced_mean: Rate = None
    attacks: dict[str, AttackRepeat]
    privacy: list[Privacy]
    events: list[Event] = Field(default_factory=list)
    cache: dict[str, Any] = Field(default_factory=dict)


class AttackSummary(Open):
    aasr: RateStat | None
    aasr_own: RateStat | None
    aasr_benign: RateStat | None
    aetr: RateStat | None
    cost_s: Stat


class Summary(Open):
    attacks: dict[str, AttackSummary]
    acc_mean: RateStat
    acc_balanced_mean: RateStat | None = None
    round_s: Stat
    epsilon: Stat | None = None


class Dataset(Open):
    classes: list[str] | None = None


class TaskMetrics(Open):
    dataset: Dataset = Field(default_factory=Dataset)
    repeats: list[Repeat] = Field(min_length=1)
    summary: Summary


class Hardware(Open):
    device: str
    torch: str
    gpu: str | None = None


class Timing(Open):
    total_s: Num


class Metrics(Open):
    scenario: str
    testbed_version: str
    seeds: list[int]
    hardware: Hardware
    timing: Timing
    tasks: dict[str, TaskMetrics]
    plots: list[str] = Field(default_factory=list)


def metrics_problems(metrics: dict[str, Any]) -> list[str]:
    """'path: message' for each way ``metrics`` falls short of what the report reads."""
    try:
        parsed = Metrics.model_validate(metrics)
    except ValidationError as exc:
        return [
            f"{p.where or 'top level'}: {p.message}"
            for p in pydantic_problems("", exc, "", Metrics)
        ]
    problems = []
    for name, task in parsed.tasks.items():
        problems += _task_problems(f"tasks.{name}", name, task)
    return problems


def _task_problems(where: str, name: str, task: TaskMetrics) -> list[str]:
    """The cross-references the tables follow: every repeat has every client and attack
    of the first, every matrix is adversaries x clients, the summary covers the attacks."""
    first = task.repeats[0]
    clients = [str(c) for c in range(len(first.acc))]
    problems = []
    for r, rep in enumerate(task.repeats):
        at = f"{where}.repeats[{r}]"
        missing = [c for c in clients if c not in rep.acc]
        if missing:
            problems.append(f"{at}.acc: no accuracy for client(s) {', '.join(missing)}")
        problems += _count_problems(at, rep.clients, task.dataset.classes)
        for label in first.attacks:
            a = rep.attacks.get(label)
            if a is None:
                problems.append(f"{at}.attacks: attack {label!r} missing")
            elif len(a.asr) != len(a.adversaries) or any(len(row) != len(clients) for row in a.asr):
                problems.append(
                    f"{at}.attacks.{label}.asr: expected {len(a.adversaries)} rows of "
                    f"{len(clients)} clients"
                )
            elif any(not 0 <= adv < len(clients) for adv in a.adversaries):
                problems.append(f"{at}.attacks.{label}.adversaries: client out of range")
    for label in first.attacks:
        if label not in task.summary.attacks:
            problems.append(f"{where}.summary.attacks: attack {label!r} missing")
    if name in TABLE_I:  # the paper's tables look attacks up by their parameters
        try:
            labels = paper_attack_labels({k: a.model_dump() for k, a in first.attacks.items()})
        except TypeError:
            return [*problems, f"{where}.repeats[0].attacks: params must be numbers"]
        for label in labels.values():
            if label is not None and label not in task.summary.attacks:
                problems.append(f"{where}.summary.attacks: attack {label!r} missing")
    return problems


def _count_problems(at: str, clients: list[Client], classes: list[str] | None) -> list[str]:
    """A client's test labels per class must add up to its test split and name each class
    once: the class floor is read from them."""
    problems = []
    for i, c in enumerate(clients):
        counts = c.test_label_counts
        if counts is None:
            continue
        where = f"{at}.clients[{i}].test_label_counts"
        if classes is not None and len(counts) != len(classes):
            problems.append(f"{where}: {len(counts)} counts for {len(classes)} classes")
        elif sum(counts) != c.test:
            problems.append(f"{where}: they add up to {sum(counts)}, not the {c.test} test images")
    return problems
