"""Problems found in a user's input, and the guards that read that input safely.

Kept apart from the scenario schema so that the sweep expander, the CLI and the report
command share one way of reading files and of turning pydantic errors into lines.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

MAX_FILE_BYTES = 16 * 1024 * 1024
"""Scenarios and metrics files are small; anything larger is not one (or is /dev/zero)."""
MAX_DEPTH = 32
"""Deepest nesting of tables and arrays a scenario may have. Real ones reach about 5;
recursive code further on (JSON round trips, pydantic) must never meet a RecursionError."""
TOO_DEEP = f"tables and arrays nested too deeply (more than {MAX_DEPTH} levels)"


@dataclass(frozen=True)
class Problem:
    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.where}: {self.message}"
            if self.where
            else (f"{self.file}: {self.message}")
        )


class ScenarioError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def read_regular_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened with O_NONBLOCK and checked with fstat on the open descriptor: a FIFO given as
    a scenario would otherwise block the read forever, and checking the path before
    opening it would leave a window in which it could be swapped. Raises OSError with a
    readable message.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise OSError(f"file too large ({st.st_size} bytes; at most {limit})")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while read
        raise OSError(f"file too large (more than {limit} bytes)")
    return data


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def too_deep(doc: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether tables and arrays nest deeper than ``limit`` (iterative: never recurses)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= limit:
            return True
        stack += [(c, depth + 1) for c in children]
    return False


def dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold directly (X, X | None, list[X], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that holds the key at ``loc`` (the last part), or None if the path
    leaves the models (a free-form dict, an ambiguous union)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list index: the element type was taken with the field
        if current is None or part not in current.model_fields:
            return None
        found = _models_in(current.model_fields[part].annotation)
        current = found[0] if len(found) == 1 else None
    return current


def unknown_key_message(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    key = loc[-1] if loc else "?"
    holder = model_at(model, loc) if model is not None and loc else None
    if holder is None:
        return f"unknown key {key!r}"
    allowed = ", ".join(holder.model_fields) or "none"
    return f"unknown key {key!r} (allowed: {allowed})"


def pydantic_problems(
    file: str,
    exc: ValidationError,
    prefix: str = "",
    model: type[BaseModel] | None = None,
) -> list[Problem]:
    """One Problem per pydantic error, except a union's members at one place, which share
    one; ``model`` is the class that was validated, so that an unknown key can list the
    keys that model allows."""
    # (where, -1 for a union's members or the error's own index) -> messages, in order
    problems: dict[tuple[str, int], list[str]] = {}
    for i, err in enumerate(exc.errors(include_url=False)):
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        union = False
        if err["type"] == "extra_forbidden":
            msg = unknown_key_message(model, loc)
        else:
            # a union reports once per member, tagged "int", "float", ...: the user wrote
            # one value at one place, so the tags go and that place gets one line
            untagged = tuple(p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p)))
            union = untagged != loc
            loc = untagged
            msg = err["msg"].removeprefix("Value error, ")
        where = dotted(loc)
        if prefix:
            where = f"{prefix}.{where}" if where else prefix
        msgs = problems.setdefault((where, -1 if union else i), [])
        if msg not in msgs:
            msgs.append(msg)
    return [Problem(file, where, _either(msgs)) for (where, _), msgs in problems.items()]


def _either(msgs: list[str]) -> str:
    """'Input should be a valid integer; or a valid number' from a union's messages."""
    head, *rest = msgs
    return "; or ".join([head, *(m.removeprefix("Input should be ") for m in rest)])


_UNION_TAG = re.compile(
    r"^(int|float|str|bool|bytes|none|constrained-(int|float|str|bytes)|"
    r"(list|dict|tuple|set|literal|is-instance|lax-or-strict|nullable)\[.*\])$"
)


def parse_document(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        text = read_regular_file(path).decode("utf-8-sig")  # a BOM (Windows) is harmless
    except FileNotFoundError:
        raise ScenarioError([Problem(file, "", "file not found")]) from None
    except OSError as exc:
        reason = exc.strerror if exc.strerror else str(exc)
        raise ScenarioError([Problem(file, "", f"cannot read: {reason}")]) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError([Problem(file, "", f"cannot read: {exc}")]) from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([Problem(file, "", f"TOML syntax error: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(
            [Problem(file, f"line {exc.lineno}", f"JSON syntax error: {exc.msg}")]
        ) from None
    except RecursionError:
        raise ScenarioError([Problem(file, "", TOO_DEEP)]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ScenarioError([Problem(file, "", f"cannot parse: {exc}")]) from None
    if not isinstance(doc, dict):
        raise ScenarioError([Problem(file, "", "top level must be a table")])
    if too_deep(doc):
        raise ScenarioError([Problem(file, "", TOO_DEEP)])
    return doc


def apply_overrides(doc: dict[str, Any], overrides: list[str], file: str) -> None:
    """`--set federation.rounds=3`: values are TOML (3, 0.5, true, "x", [1, 2]); a bare
    word is a string. Paths walk tables and list indices: attacks.0.params.eps, or
    attacks[0].params.eps as `testbed validate` names that place."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(Problem(file, f"--set {item}", "expected KEY=VALUE"))
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError, ValueError):
            value = raw  # not a TOML value: a bare word, kept as the string it is
        node: Any = doc
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append(Problem(file, f"--set {key}", "no such place in the scenario"))
    if problems:
        raise ScenarioError(problems)
