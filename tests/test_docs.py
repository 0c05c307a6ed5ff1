"""Every hook in the public API is documented in the plugin author's guide."""

import inspect

from conftest import REPO

from testbed import hookspecs


def test_every_hook_is_in_the_plugin_guide():
    guide = (REPO / "docs" / "plugins.md").read_text()
    hooks = [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("testbed_")
    ]
    assert len(hooks) >= 14
    missing = [h for h in hooks if f"`{h}" not in guide]
    assert not missing, f"undocumented hooks: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    (command,) = [
        line.strip() for line in readme.splitlines() if line.strip().endswith("python -m pytest")
    ]
    assert command in ci.splitlines()
