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
