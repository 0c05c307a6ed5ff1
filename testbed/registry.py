"""Named components that plugins register and scenarios refer to by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from testbed.strict import StrictModel

Stage = Literal["training", "inference", "both"]
"""When a component acts. Only components that act during training are part of the
federation cache key: changing an inference-only defence never retrains."""

KINDS = (
    "datasets",
    "partitioners",
    "models",
    "aggregators",
    "dp_mechanisms",
    "defences",
    "attacks",
    "poisoning",
    "engines",
)


def singular(kind: str) -> str:
    """One component of a kind, for messages: "datasets" -> "dataset"; "poisoning" stays."""
    return kind[:-1] if kind.endswith("s") else kind


class Params(StrictModel):
    """Base for every component's parameters: unknown keys are errors, and so are NaN,
    infinite and beyond-float32 numbers (testbed.strict)."""

    model_config = ConfigDict(frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    plugin: str
    description: str = ""
    check: Callable[[Any, Any], list[str]] | None = None
    """Optional ``check(params, scenario) -> problems``: rules that need the rest of the
    scenario (e.g. Krum's n > 2f + 2 needs the number of sampled clients)."""
    stage: Stage = "both"


class DuplicateComponentError(ValueError):
    pass


@dataclass
class KindRegistry:
    """Handed to a `testbed_register_<kind>` hook; plugins call `add`."""

    kind: str
    components: dict[str, Component] = field(default_factory=dict)
    current_plugin: str = "?"

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        params: type[BaseModel] = NoParams,
        description: str = "",
        check: Callable[[Any, Any], list[str]] | None = None,
        stage: Stage = "both",
    ) -> None:
        """``stage``: "inference" for a component that never changes training (an input
        transformation at deployment); the default "both" is always safe."""
        if name in self.components:
            other = self.components[name].plugin
            raise DuplicateComponentError(
                f"{singular(self.kind)} {name!r} registered twice "
                f"(by {other} and {self.current_plugin})"
            )
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(
                f"plugin {self.current_plugin}: params for {singular(self.kind)} {name!r} "
                "must be a pydantic model class"
            )
        self.components[name] = Component(
            self.kind, name, factory, params, self.current_plugin, description, check, stage
        )

    def get(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            known = ", ".join(sorted(self.components)) or "none"
            raise KeyError(f"unknown {singular(self.kind)} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self.components)


@dataclass
class Registry:
    kinds: dict[str, KindRegistry] = field(
        default_factory=lambda: {k: KindRegistry(k) for k in KINDS}
    )

    def __getitem__(self, kind: str) -> KindRegistry:
        return self.kinds[kind]

    def build(self, kind: str, name: str, params: BaseModel | dict[str, Any], **kw: Any) -> Any:
        comp = self.kinds[kind].get(name)
        if not isinstance(params, comp.params):
            params = comp.params.model_validate(params)
        return comp.factory(params, **kw)
