"""Fingerprints of what a result was computed from: the decoded data and the code.

A cached federation or a resumed run is only valid for the same data and the same code.
Paths and version strings are not enough: a data root can hold another copy of a dataset
under the same name, and an editable install keeps its version while its code changes.
So both are hashed by content, and the versions of the libraries that compute with
them are part of the code.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from testbed.rundir import RunError

if TYPE_CHECKING:
    from testbed.data import ImageDataset
    from testbed.pluginmanager import Host


def data_fingerprint(ds: ImageDataset) -> str:
    """The decoded images, labels and class names (what training and attacks see)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(ds.x.shape), ds.classes)).encode())
    h.update(ds.x.contiguous().cpu().numpy().tobytes())
    h.update(ds.y.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def _source_digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path), st.st_mtime_ns, st.st_size)


def _package_files(module: ModuleType) -> list[Path]:
    """The .py files of a module, or of every module under a package."""
    file = getattr(module, "__file__", None)
    if not file:
        return []
    path = Path(file)
    if path.name == "__init__.py":
        return sorted(path.parent.rglob("*.py"))
    return [path]


def _module_of(obj: object) -> ModuleType | None:
    if isinstance(obj, ModuleType):
        return obj
    return inspect.getmodule(obj) or sys.modules.get(type(obj).__module__)


def _top_package(mod: ModuleType) -> ModuleType:
    """The top-level package ``mod`` belongs to, where that package has source files."""
    top = sys.modules.get(mod.__name__.partition(".")[0])
    return top if top is not None and getattr(top, "__file__", None) else mod


def code_fingerprint(host: Host, extra: Iterable[object] = ()) -> dict[str, str]:
    """Module name -> content digest, for testbed itself, every loaded plugin and the
    module of every registered component's factory (and of ``extra`` objects)."""
    import testbed

    modules: dict[str, ModuleType] = {"testbed": testbed}
    # a plugin is its whole top-level package: an entry point such as mypkg.plugin
    # imports its siblings (mypkg.maths), whose edits must change the digest too
    plugins = [_top_package(m) for _, p in host.pm.list_name_plugin() if (m := _module_of(p))]
    objs: list[object] = [
        c.factory for k in host.registry.kinds.values() for c in k.components.values()
    ]
    objs += list(extra)
    for mod in [*plugins, *filter(None, map(_module_of, objs))]:
        modules.setdefault(mod.__name__, mod)
    out: dict[str, str] = {}
    for name in sorted(modules):
        files = _package_files(modules[name])
        if name != "testbed" and any(
            str(f).startswith(str(Path(testbed.__file__).parent)) for f in files
        ):
            continue  # inside testbed: already covered by the package digest
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(str(f.name).encode())
            h.update(_source_digest(f).encode())
        out[name] = h.hexdigest() if files else "(no source file)"
    dists = {f"dist:{d}": v for d, v in host.sources.values() if d}
    return {**out, **dict(sorted(dists.items())), **library_versions()}


# The libraries testbed computes with: a new Opacus (noise, accounting), ART (the attacks
# adversarial training crafts), torchvision (augmentation), numpy (partitions) or
# scikit-learn (FLAME's clustering) is other code. torch is the host's float path instead
# (hostinfo.py): a federation from another torch is used, and said so.
LIBRARIES = (
    "adversarial-robustness-toolbox", "captum", "numpy", "opacus", "optuna", "pillow",
    "scikit-image", "scikit-learn", "scipy", "torchvision",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    """``lib:<distribution>`` -> installed version, "(absent)" where not installed."""
    out = {}
    for name in LIBRARIES:
        try:
            out[f"lib:{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"lib:{name}"] = "(absent)"
    return out


def check_code_unchanged(host: Host, started: dict[str, str], before: str) -> None:
    """Refuse to record numbers once the code on disk differs from the code the run started
    with (an editable install edited under a long run): modules imported after the edit
    are the new code, so the numbers could mix two versions under the old fingerprint."""
    now = code_fingerprint(host)
    if now != started:
        changed = sorted(k for k in started.keys() | now.keys() if started.get(k) != now.get(k))
        raise RunError(
            f"the code changed on disk while the run was going ({', '.join(changed)}), so "
            f"nothing more is recorded ({before}): run from a checkout that stays put"
        )
