"""The scenario schema: the pydantic models a scenario file is validated against.

Loading a file (overrides, the registry pass over each component's params) is
testbed/scenario_load.py's.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from testbed.search_config import Search
from testbed.strict import StrictModel as Strict
from testbed.threat import threat_problems

MAX_SEED = 2**63 - 1
"""Seeds are 0..2**63-1: every generator (torch, numpy) takes them, and a seed + repeat
never overflows the 64-bit integers they are stored in."""
MAX_REPEATS = 1000
"""More repeats than any evaluation needs; a typo such as 10**9 must not build that list."""
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _safe_file_name(v: str) -> str:
    # Scenario and task names become folder and file names: '..' or '.x' would climb out
    # of the run folder or hide inside it.
    if not v or v.startswith(".") or len(v) > 100:
        raise ValueError(
            f"must be a safe file name: 1-100 letters, digits, '_', '-', '.', not starting "
            f"with '.', got {v!r}"
        )
    return v


SafeName = Annotated[str, AfterValidator(_safe_file_name)]

SECTION_KINDS = {
    "data": "datasets",
    "partition": "partitioners",
    "model": "models",
    "aggregator": "aggregators",
    "dp": "dp_mechanisms",
    "defences": "defences",
    "attacks": "attacks",
    "poisoning": "poisoning",
    "engine": "engines",
}


class Component(Strict):
    name: str = Field(description="Registered component name (see `testbed plugins`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The component's own parameters."
    )


class Meta(Strict):
    name: SafeName = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Used in the run folder name.")
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Fixes every random choice of a run.")


class Augment(Strict):
    hflip: bool = True
    vflip: bool = False
    rotate_degrees: float = Field(0.0, ge=0, le=180)


class Data(Component):
    augment: Augment = Field(default_factory=Augment)


class Task(Strict):
    name: SafeName = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Task label in reports.")
    data: Data


class Partition(Component):
    name: str = "noniid_chunks"
    train_fraction: float = Field(0.62, gt=0, lt=1, description="Per-client train share.")


class Model(Component):
    name: str = "paper_cnn"


class Aggregator(Component):
    name: str = "fedavg"


class Federation(Strict):
    clients: int = Field(3, ge=1, description="N: clients in the federation.")
    sampled: int | None = Field(None, ge=1, description="m: clients per round (None: all).")
    client_sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': exactly m of N without replacement (the paper; DP accounted "
        "without amplification). 'poisson': each client independently with q = m / N "
        "(DP-FedAvg, McMahan et al. 2018; accounted with amplification by q); a round may "
        "then sample nobody and keep the global model.",
    )
    rounds: int = Field(50, ge=1, description="T: communication rounds.")
    local_epochs: int = Field(20, ge=1, description="E: local epochs per round.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    max_update_norm: float = Field(
        1e4, gt=0, description="Uploads above this L2 norm are hostile or broken."
    )
    on_excess_norm: Literal["drop", "clip"] = Field(
        "drop",
        description="Drop such an upload, or clip it to max_update_norm. Uploads with "
        "NaN/Inf or the wrong shape are always dropped.",
    )

    @model_validator(mode="after")
    def _sampled_le_clients(self) -> Federation:
        if self.sampled is not None and self.sampled > self.clients:
            raise ValueError(f"sampled ({self.sampled}) must not exceed clients ({self.clients})")
        return self

    @property
    def m(self) -> int:
        return self.sampled or self.clients


class ThreatModel(Strict):
    adversaries: Literal["rotate", "malicious"] | list[int] = Field(
        "rotate",
        description="Evasion: 'rotate' (every client in turn), 'malicious' (the compromised "
        "clients) or a list of client indices.",
    )
    samples_per_adversary: int = Field(100, ge=1, description="Own test images attacked.")
    malicious: list[int] | None = Field(
        None, description="Compromised clients that run the [[poisoning]] attacks."
    )
    malicious_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Or this share of the clients, round(f * N) >= 1, drawn from the seed.",
    )
    collude: bool = Field(
        False, description="Compromised clients see the round's benign updates (omniscient)."
    )

    @field_validator("adversaries", mode="before")
    @classmethod
    def _rotate_or_indices(cls, v: Any) -> Any:
        # One clear message instead of one per member of the union.
        ok = v in ("rotate", "malicious") or (
            isinstance(v, list) and all(isinstance(a, int) and not isinstance(a, bool) for a in v)
        )
        if not ok:
            raise ValueError(
                f"must be 'rotate', 'malicious' or a list of client indices, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _one_way_to_name_them(self) -> ThreatModel:
        if self.malicious is not None and self.malicious_fraction is not None:
            raise ValueError("give malicious or malicious_fraction, not both")
        return self


class Attack(Component):
    label: str = Field("", description="Name in reports; default NAME or NAME-max_iter.")
    sweep_of: str = Field("", description="Set by sweep expansion: the swept entry's label.")
    sweep_point: dict[str, float | int] = Field(
        default_factory=dict, description="Set by sweep expansion: this attack's values."
    )

    @model_validator(mode="after")
    def _default_label(self) -> Attack:
        if not self.label:
            steps = self.params.get("max_iter")
            self.label = self.name.upper() + (f"-{steps}" if steps else "")
        return self


class Outsider(Strict):
    """An adversary without the federated model: it crafts on a surrogate of the same
    architecture trained only on its own training data (testbed/outsider.py)."""

    epochs: int = Field(ge=1, description="Epochs of training the surrogate on its data.")


class Explain(Strict):
    """Explanations of the first adversary's attacked images and whether they tell clean
    from adversarial inputs (testbed/explain.py); off when the table is absent."""

    methods: list[Literal["saliency", "integrated_gradients", "gradcam"]] = Field(
        default_factory=lambda: ["saliency", "integrated_gradients", "gradcam"],
        min_length=1,
        description="Captum attribution methods (gradcam: the model's last convolution).",
    )
    images: int = Field(
        16, ge=2, description="Attacked images explained per attack (clean and adversarial)."
    )
    top_k: float = Field(
        0.1, gt=0, le=1, description="k of the top-k overlap, as a share of the pixels."
    )
    ig_steps: int = Field(20, ge=2, description="Integrated gradients' integration points.")
    folds: int = Field(5, ge=2, description="Cross-validation folds of the detector, by image.")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must be unique, got {v}")
        return v


class Evaluation(Strict):
    repeats: int = Field(
        1, ge=1, le=MAX_REPEATS, description="Independent runs (train + attack) per scenario."
    )
    seeds: list[Seed] | None = Field(
        None, max_length=MAX_REPEATS, description="Seeds of the repeats; default seed+r."
    )

    @model_validator(mode="after")
    def _seeds_match(self) -> Evaluation:
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            # one seed twice is one run twice: a spread of 0 over "independent" repeats
            raise ValueError(f"seeds repeat a seed: {self.seeds}")
        if self.seeds is not None and len(self.seeds) != self.repeats:
            if "repeats" in self.model_fields_set:
                raise ValueError(f"{len(self.seeds)} seeds given for {self.repeats} repeats")
            self.repeats = len(self.seeds)
        return self


class Report(Strict):
    out_dir: str = Field("reports", description="Parent of run folders (relative to cwd).")
    plots: bool = True
    save_weights: bool = True
    save_round_weights: bool = Field(
        False, description="Also save the global model after every round (weights/)."
    )


class Engine(Component):
    """Who runs the clients: this process, stacked on one device, or Flower's simulation
    engine (Ray)."""

    name: str = Field("inprocess", description="A registered engine (testbed_register_engines).")
    client_cpus: float = Field(1.0, gt=0, description="Ray CPUs per simulated client.")
    client_gpus: float = Field(0.0, ge=0, description="Ray GPUs (fraction) per client.")
    ray_init_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra ray.init arguments (e.g. num_cpus)."
    )
    timeout_s: float = Field(
        3600.0, gt=0, description="How long the server waits for a round's replies."
    )

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class Scenario(Strict):
    scenario: Meta
    data: Data | None = Field(None, description="The dataset, for a single-task scenario.")
    tasks: list[Task] = Field(
        default_factory=list, description="Several datasets run with the same setup."
    )
    partition: Partition = Field(default_factory=Partition)
    model: Model = Field(default_factory=Model)
    federation: Federation = Field(default_factory=Federation)
    aggregator: Aggregator = Field(default_factory=Aggregator)
    dp: Component | None = None
    defences: list[Component] = Field(default_factory=list)
    threat_model: ThreatModel = Field(default_factory=ThreatModel)
    attacks: list[Attack] = Field(default_factory=list)
    outsider: Outsider | None = Field(
        None, description="Also craft every attack on a surrogate trained on own data only."
    )
    poisoning: list[Component] = Field(
        default_factory=list, description="Training-time attacks of the compromised clients."
    )
    explain: Explain | None = Field(
        None, description="Explain the attacked images (Captum) and measure if that helps."
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)
    report: Report = Field(default_factory=Report)
    engine: Engine = Field(
        default_factory=Engine,
        description='"inprocess" (default), "batched" or "flower", or a table.',
    )
    search: Search | None = Field(
        None, description="`testbed search`: the attack to tune and how (`run` ignores it)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        if (self.data is None) == (not self.tasks):
            raise ValueError("give either [data] or [[tasks]], not both or neither")
        # Counter, not list.count: a sweep can make thousands of attacks (linear, not n^2).
        repeated = sorted(n for n, k in Counter(t.name for t in self.tasks).items() if k > 1)
        if repeated:
            raise ValueError(f"tasks: task names must be unique; repeated: {', '.join(repeated)}")
        adv = self.threat_model.adversaries
        if isinstance(adv, list):
            bad = [a for a in adv if not 0 <= a < self.federation.clients]
            if bad:
                raise ValueError(
                    f"threat_model.adversaries {bad} out of range 0..{self.federation.clients - 1}"
                )
            if len(set(adv)) != len(adv):  # it would count twice in every mean over them
                raise ValueError(f"threat_model.adversaries {adv} names a client twice")
        pool = self.threat_model.samples_per_adversary
        if self.explain is not None and self.explain.images > pool:
            raise ValueError(
                f"explain.images ({self.explain.images}) exceeds "
                f"threat_model.samples_per_adversary ({pool})"
            )
        threat = threat_problems(self.threat_model, self.federation.clients, bool(self.poisoning))
        if threat:
            raise ValueError(threat[0])
        dupes = sorted(n for n, k in Counter(a.label for a in self.attacks).items() if k > 1)
        if dupes:
            # A sweep with repeated values repeats thousands of labels: name a few.
            more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
            raise ValueError(
                "attacks: attack labels must be unique (set `label`); repeated: "
                f"{', '.join(dupes[:5])}{more}"
            )
        if self.search is not None:
            problem = self.search.problem(
                [a.label for a in self.attacks], [t.name for t in self.task_list()]
            )
            if problem:
                raise ValueError(problem)
        last = self.scenario.seed + self.evaluation.repeats - 1
        if self.evaluation.seeds is None and last > MAX_SEED:
            raise ValueError(
                f"scenario.seed + evaluation.repeats - 1 = {last} exceeds the largest seed "
                f"{MAX_SEED}"
            )
        return self

    def task_list(self) -> list[Task]:
        if self.data is not None:
            return [Task(name=self.data.name, data=self.data)]
        return list(self.tasks)

    def seeds(self) -> list[int]:
        ev = self.evaluation
        return ev.seeds or [self.scenario.seed + r for r in range(ev.repeats)]

    def components(self) -> list[tuple[str, str, Component]]:
        """(dotted path, registry kind, spec) of every component in the scenario."""
        out: list[tuple[str, str, Component]] = [
            (f"tasks[{i}].data", "datasets", t.data) for i, t in enumerate(self.tasks)
        ]
        for section, kind in SECTION_KINDS.items():
            value = getattr(self, section)
            if isinstance(value, list):
                out += [(f"{section}[{i}]", kind, c) for i, c in enumerate(value)]
            elif value is not None:
                out.append((section, kind, value))
        return out


def resolved_dict(scenario: Scenario) -> dict[str, Any]:
    """The scenario with every default filled in, as written to the run folder."""
    return scenario.model_dump(mode="json")
