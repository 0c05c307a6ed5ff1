"""Build the plugin manager and the component registry from installed plugins."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from testbed import PROJECT, hookspecs
from testbed.registry import KINDS, Registry

DISABLE_AUTOLOAD_ENV = "TESTBED_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "TESTBED_PLUGINS"


class PluginError(Exception):
    """A plugin failed to load or a hook implementation raised; names both."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass
class Host:
    pm: pluggy.PluginManager
    registry: Registry
    sources: dict[str, tuple[str, str]]
    """Plugin name -> (distribution, version) for plugins loaded from entry points."""
    modules: tuple[str, ...] = ()
    """Plugin modules named with -p or TESTBED_PLUGINS (a Flower ClientApp loads them too)."""

    @property
    def hook(self) -> Any:
        """Hook caller for the engine: an exception inside a plugin's hook becomes a
        PluginError naming the plugin and the hook."""
        return _NamingHooks(self.pm)

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            dist, ver = self.sources.get(name, ("(module)", ""))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            infos.append(PluginInfo(name=name, distribution=dist, version=ver, hooks=hooks))
        return sorted(infos, key=lambda i: (i.distribution != PROJECT, i.name))

    @contextmanager
    def active(self, objects: Iterable[object]) -> Iterator[None]:
        """Register per-run plugin objects (defences, DP) so the first listed runs first."""
        objs = list(objects)
        try:
            for i, obj in enumerate(reversed(objs)):
                _register(
                    self.pm, obj, f"{type(obj).__module__}.{type(obj).__name__}#{len(objs) - 1 - i}"
                )
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc
            yield
        finally:
            for obj in objs:
                if self.pm.is_registered(obj):
                    self.pm.unregister(obj)


class _NamingHooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def implementers(self, name: str) -> list[str]:
        return [i.plugin_name for i in getattr(self._pm.hook, name).get_hookimpls()]

    def call_each(self, name: str, after: Callable[[], None], **kwargs: Any) -> None:
        """Call hook ``name`` one plugin at a time, in pluggy's order, running ``after()``
        between them; a ValueError or TypeError from ``after`` (a check of what that
        plugin did) becomes a PluginError naming the plugin."""
        caller = getattr(self._pm.hook, name)
        impls = caller.get_hookimpls()
        for impl in reversed(impls):  # pluggy calls the last of this list first
            others = [i.plugin for i in impls if i is not impl]
            single = self._pm.subset_hook_caller(name, remove_plugins=others)
            try:
                single(**kwargs)
                after()
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {name}: {type(exc).__name__}: {exc}"
                ) from exc

    def __getattr__(self, name: str) -> Any:
        caller = getattr(self._pm.hook, name)

        def call(**kwargs: Any) -> Any:
            try:
                return caller(**kwargs)
            except PluginError:
                raise
            except Exception as exc:
                plugin = _culprit(caller, exc)
                raise PluginError(
                    f"plugin {plugin!r} failed in {name}: {type(exc).__name__}: {exc}"
                ) from exc

        return call


def _culprit(caller: Any, exc: BaseException) -> str:
    """The plugin whose hook implementation is on the exception's traceback."""
    codes = set()
    tb = exc.__traceback__
    while tb is not None:
        codes.add(tb.tb_frame.f_code)
        tb = tb.tb_next
    for impl in caller.get_hookimpls():
        func = getattr(impl.function, "__func__", impl.function)
        if getattr(func, "__code__", None) in codes:
            return impl.plugin_name
    return "?"


def _load_entrypoints(pm: pluggy.PluginManager, builtins_only: bool) -> dict[str, tuple[str, str]]:
    sources: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group=PROJECT):
        dist = ep.dist.name if ep.dist else ""
        if builtins_only and dist != PROJECT:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({dist}) failed to load: {exc}") from exc
        name = ep.name if dist == PROJECT else f"{dist}:{ep.name}"
        _register(pm, plugin, name)
        sources[name] = (dist, ep.dist.version if ep.dist else "")
    return sources


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> None:
    """Register, turning pluggy's signature checks into one-line errors."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name or plugin!r} is invalid: {exc}") from exc
    except ValueError as exc:  # a name registered twice
        raise PluginError(f"plugin {name!r}: {exc}") from exc
    # pluggy registers a plugin with no @hookimpl silently; here that is always a mistake
    # (an undecorated function, the wrong module named), and it would leave the user
    # believing a defence or attack was in play.
    if not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        raise PluginError(
            f"plugin {name or plugin!r} implements no testbed hook: "
            "mark its hook functions with @testbed.hookimpl"
        )


def build_host(
    extra_modules: Iterable[str] = (), autoload: bool | None = None, extra: Iterable[object] = ()
) -> Host:
    """Plugin manager with the hook specs, entry-point plugins and named modules.

    Third-party entry points load unless ``autoload`` is False or the environment sets
    TESTBED_DISABLE_PLUGIN_AUTOLOAD=1; built-ins always load. Modules named in
    ``extra_modules`` or in TESTBED_PLUGINS (comma-separated) are imported and registered.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
    sources = _load_entrypoints(pm, builtins_only=not autoload)
    names = [*extra_modules, *filter(None, os.environ.get(EXTRA_PLUGINS_ENV, "").split(","))]
    for modname in names:
        modname = modname.strip()
        if pm.has_plugin(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            raise PluginError(f"plugin module {modname!r} failed to import: {exc}") from exc
        _register(pm, module, modname)
    for i, obj in enumerate(extra):
        _register(pm, obj, f"{type(obj).__module__}.{type(obj).__name__}#{i}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc
    return Host(pm, collect_registry(pm), sources, tuple(n.strip() for n in names))


def collect_registry(pm: pluggy.PluginManager) -> Registry:
    registry = Registry()
    for kind in KINDS:
        caller = getattr(pm.hook, f"testbed_register_{kind}")
        kreg = registry[kind]
        for impl in caller.get_hookimpls():
            kreg.current_plugin = impl.plugin_name
            try:
                impl.function(registry=kreg)
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in testbed_register_{kind}: {exc}"
                ) from exc
    return registry


def implementers_text(hooks: Any, name: str) -> str:
    """The plugin(s) implementing hook ``name``, for one-line error messages."""
    return " or ".join(repr(n) for n in hooks.implementers(name)) or "?"
