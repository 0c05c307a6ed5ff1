"""The on-disk cache of decoded datasets, shared by the built-in loaders.

Decoding thousands of JPEG, PNG or TIFF files is slow and every run on the same data
needs the same tensors, so a loader keeps what it decoded ({x, y, ids, info}) under
``$TESTBED_CACHE_DIR`` (default ``~/.cache/testbed``), keyed by the loader's parameters,
the names, sizes and contents of its source files, the loaders' own code and the
decoding libraries' versions. Kept apart from the loaders because the runner and the
search keep their trained federations in the same folder (``cache_dir() / "federations"``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision

CACHE_ENV = "TESTBED_CACHE_DIR"
DATA_KEY_ENV = "TESTBED_DATA_KEY"
# The payload's format, checked on load (a change to the decoding changes the key itself)
CACHE_VERSION = 1


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbed"


@lru_cache(maxsize=4)
def _decoder_digest(here: Path = Path(__file__).parent) -> str:
    """The loaders' own source (this folder's dataset_*.py and testbed/data.py): an edit to
    the decoding or resizing misses every cache, with no version number to remember."""
    h = hashlib.blake2b(digest_size=16)
    for f in [*sorted(here.glob("dataset_*.py")), here.parent / "data.py"]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _cache_key(*parts: object) -> str:
    """``parts`` with the loaders' code and, keyed by content, the decoders' versions
    (libjpeg, libpng and the resize kernels ship with them). By stamps (a GPU lease), the
    versions are the lent machine's own, and its images are compared after loading."""
    libs = () if _by_stamps() else (torchvision.__version__, PIL.__version__)
    key = repr((CACHE_VERSION, _decoder_digest(), libs, *parts))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _by_stamps() -> bool:
    return os.environ.get(DATA_KEY_ENV, "content") == "stamps"


def _file_stamp(files: Sequence[Path], base: Path) -> list[tuple[str, int, int | str]]:
    """Each source file's name, size and content digest: an edit that keeps a file's size
    and mtime (``touch -r``, ``cp -p``, ``rsync -a``) still misses the cache. Reading the
    files costs about 0.1 s per 40 MB, against seconds to decode them.

    ``TESTBED_DATA_KEY=stamps`` keys by mtime instead, for a machine that holds empty
    stand-ins of the images beside their decoded cache (scripts/lease, which compares the
    decoded images with the packed ones itself before any run)."""
    by_mtime = _by_stamps()
    out: list[tuple[str, int, int | str]] = []
    for f in files:
        st = f.stat()
        if by_mtime:
            mark: int | str = st.st_mtime_ns
        else:
            mark = hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()
        out.append((f.relative_to(base).as_posix(), st.st_size, mark))
    return out


def _load_cache(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
            return None
        x, y = payload["x"], payload["y"]
        ok = (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == torch.uint8
            and x.ndim == 4
            and y.dtype == torch.int64
            and y.shape == (x.shape[0],)
            and len(payload["ids"]) == x.shape[0]
            and isinstance(payload["info"], dict)
        )
        return payload if ok else None
    except Exception:
        # A truncated or foreign file is just a cache miss; it is rebuilt and replaced.
        return None


def _save_cache(path: Path, payload: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
            # Atomic, so a concurrent reader never sees a half-written cache.
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        # An unwritable cache folder costs only speed, never a run.
        pass


def cached(
    kind: str, key_parts: tuple[object, ...], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The payload ``build()`` returns ({x, y, ids, info}), kept on disk across runs."""
    path = cache_dir() / f"{kind}-{_cache_key(*key_parts)}.pt"
    # Whether it was a hit stays out of ``info``: reports of equal runs must be equal.
    payload = _load_cache(path)
    if payload is None:
        payload = {"version": CACHE_VERSION, **build()}
        _save_cache(path, payload)
    return payload
