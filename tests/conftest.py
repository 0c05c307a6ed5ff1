from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests see only the built-in plugins unless a test registers more.
os.environ.setdefault("TESTBED_DISABLE_PLUGIN_AUTOLOAD", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Datasets and trained federations cache to a folder of this test session (CI sets
    its own), so no test reads what an earlier session left in ~/.cache."""
    if "TESTBED_CACHE_DIR" not in os.environ:
        os.environ["TESTBED_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets. Mandatory in CI (CI=true): missing data fails there, skips elsewhere."""
    root = os.environ.get("TESTBED_DATA_ROOT")
    if root and Path(root).is_dir():
        return Path(root)
    msg = f"real datasets not found (TESTBED_DATA_ROOT={root!r})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + ": they are mandatory in CI")
    pytest.skip(msg)


@pytest.fixture
def isolated_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real data root, a private dataset cache, and a cwd where stray output shows."""
    monkeypatch.delenv("TESTBED_DATA_ROOT", raising=False)
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
