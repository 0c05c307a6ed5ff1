"""Run folders: built under a hidden name, locked while written, checkpointed atomically.

A run writes into ``.NAME.partial`` and renames it to ``NAME`` only when complete, so a
finished report is never half-written. One process at a time holds the folder (an
advisory lock), and its manifest records what the run was started from (the scenario
file's digest, the code, each task's data, the host), so ``--resume`` refuses to mix in
other data, other code or an edited scenario, and a report says where the host changed.
A partial folder that holds any finished work is never deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class RunError(Exception):
    """A run cannot proceed because of its input (data, device, folder); one line."""


def make_dir(path: Path, what: str) -> None:
    """Create ``path`` (and its parents) or raise RunError naming ``what``: an unusable
    output location is the user's to fix, in one line, before any work rather than after."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # mkdir says "File exists" when a file stands where a folder must go
        why = "a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror
        raise RunError(f"cannot create {what} ({exc.filename}: {why})") from None


def json_safe(obj: Any) -> Any:
    """Strict JSON: NaN (an undefined rate) becomes null, infinity the string "inf"."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if math.isinf(obj) else obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_name(label: str) -> str:
    """A label as a file name: letters, digits, '.', '_' and '-' only, never '.' or '..'."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return "_" + name if name.strip(".") == "" else name


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def final_dir_of(path: Path) -> Path:
    """Accept either a run folder or its hidden partial folder."""
    name = path.name
    if name.startswith(".") and name.endswith(".partial"):
        return path.parent / name[1 : -len(".partial")]
    return path


@dataclass(frozen=True)
class Checkpoints:
    root: Path

    def _dir(self, task: str) -> Path:
        d = self.root / safe_name(task)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_training(self, task: str, seed: int, payload: dict[str, Any]) -> None:
        torch_save_atomic(payload, self._dir(task) / f"seed{seed}.train.pt")

    def load_training(self, task: str, seed: int) -> dict[str, Any] | None:
        path = self.root / safe_name(task) / f"seed{seed}.train.pt"
        if not path.exists():
            return None
        try:
            # weights_only: a checkpoint is data, never code
            payload = torch.load(path, weights_only=True)
        except Exception as exc:
            raise RunError(f"checkpoint {path} is damaged ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or not {"round", "global", "clients"} <= payload.keys():
            raise RunError(f"checkpoint {path} is not a testbed training checkpoint")
        return payload

    def save_json(self, task: str, seed: int, kind: str, obj: Any) -> None:
        write_json(self._dir(task) / f"seed{seed}.{kind}.json", obj)

    def load_json(self, task: str, seed: int, kind: str) -> Any:
        path = self.root / safe_name(task) / f"seed{seed}.{kind}.json"
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"checkpoint {path} is damaged: {exc}") from None
        if not isinstance(obj, dict):
            raise RunError(f"checkpoint {path} is not a testbed checkpoint")
        return obj

    def holds_work(self) -> bool:
        """Any finished round, attack or seed (the manifest alone is no work)."""
        return self.root.is_dir() and any(
            p.is_file() and p != self._manifest for p in self.root.rglob("*")
        )

    # The manifest: what the run was started from.

    @property
    def _manifest(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        try:
            obj = json.loads(self._manifest.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunError(f"{self._manifest} is damaged: {exc}") from None
        if not isinstance(obj, dict):
            raise RunError(f"{self._manifest} is not a testbed manifest")
        return obj

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self._manifest, manifest)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same(what: str, recorded: Any, now: Any, hint: str) -> None:
    """Refuse to continue a run whose inputs changed since it started."""
    if recorded is None:
        raise RunError(f"the run folder does not record its {what}; {hint}")
    if recorded != now:
        if isinstance(recorded, dict) and isinstance(now, dict):
            changed = sorted(
                k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k)
            )
            raise RunError(
                f"the {what} changed since the run started ({', '.join(changed)}); {hint}"
            )
        raise RunError(f"the {what} changed since the run started; {hint}")


@contextmanager
def _locked(staging: Path) -> Iterator[None]:
    """Hold an advisory lock on the folder: a second writer gets one line, not a mix."""
    fd = os.open(staging / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{staging} is in use by another testbed process") from None
        yield
    finally:
        os.close(fd)


def _in_use(staging: Path) -> bool:
    try:
        fd = os.open(staging / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def staged_run_dir(final: Path, resume: bool) -> Iterator[Path]:
    """Yield the locked partial folder; rename it to `final` only when the run completes.
    On a failure the folder is removed only if it holds no finished work."""
    staging = partial_dir(final)
    if final.exists():
        raise RunError(f"run folder {final} already exists" + (" (complete)" if resume else ""))
    if resume:
        if not staging.is_dir():
            raise RunError(f"nothing to resume: {staging} does not exist")
    else:
        if staging.exists():
            if _in_use(staging):
                raise RunError(f"{staging} is in use by another testbed process")
            raise RunError(
                f"an interrupted run is in {staging}: resume it with "
                f"`testbed run --resume {final}` or delete it"
            )
        make_dir(final.parent, f"the run folder {final}")
        try:
            staging.mkdir()
        except FileExistsError:  # another process started the same folder just now
            raise RunError(f"{staging} is in use by another testbed process") from None
        except OSError as exc:
            raise RunError(
                f"cannot create the run folder {final} ({staging}: {exc.strerror})"
            ) from None
    with _locked(staging):
        try:
            yield staging
        except BaseException:
            if not resume and not Checkpoints(staging / "checkpoint").holds_work():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / ".lock").unlink(missing_ok=True)
        os.replace(staging, final)
