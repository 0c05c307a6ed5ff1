"""testbed: measure how defences hold up against adversarial transfer attacks in FL."""

from importlib.metadata import PackageNotFoundError, version

import pluggy

PROJECT = "testbed"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

try:
    __version__ = version(PROJECT)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["PROJECT", "__version__", "hookimpl", "hookspec"]
