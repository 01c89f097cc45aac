"""One registry type for datasets, backbones, losses and methods: register, create by name, list."""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import sys
from typing import Any, Callable, Iterator

from benchmark.errors import UserError


class UnknownNameError(UserError):
    """A name that no entry of a registry carries."""


class Registry:
    """Named factories of one kind, each with a one-line description.

    ``@REG.register("name")`` decorates a class or function; ``REG.create("name", **kwargs)``
    calls it; ``REG.names()`` lists what is there.  A name ending in ":" registers a family:
    ``create("family:member", **kw)`` calls its factory as ``factory("member", **kw)``.  The
    description is the first line of the factory's docstring unless given.  Registering a
    taken name fails, unless the factory is the same module's same class or function (a module
    imported again, as ``reload_plugins`` may do), which then replaces it.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Callable[..., Any], str]] = {}

    def register(self, name: str, description: str | None = None) -> Callable:
        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and not same_definition(self._entries[name][0], factory):
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            lines = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = (factory, description or (lines[0].strip() if lines else ""))
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        """The factory for ``name``; a family entry ``"prefix:"`` serves every ``prefix:rest``."""
        load_plugins()
        if name in self._entries:
            return self._entries[name][0]
        prefix = name.split(":", 1)[0] + ":"
        if ":" in name and prefix in self._entries:
            return functools.partial(self._entries[prefix][0], name.split(":", 1)[1])
        raise UnknownNameError(
            f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            + "".join(f"; plugin '{plugin}' failed to import ({error}) and may provide it"
                      for plugin, error in _failed_plugins.items()))

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def check_params(self, name: str, params: dict[str, Any]) -> None:
        """Fail with one line, before anything runs, if ``name`` takes no such keywords."""
        try:
            signature = inspect.signature(self.get(name))
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            return
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return
        unknown = sorted(set(params) - set(signature.parameters))
        if unknown:
            valid = [p for p in signature.parameters if p not in ("self",)]
            raise UserError(f"{self.kind} '{name}' takes no parameter {', '.join(unknown)}; "
                            f"it takes {', '.join(valid) or 'none'}")

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        return [(name, self._entries[name][1]) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def same_definition(old: Callable[..., Any], new: Callable[..., Any]) -> bool:
    return (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
        getattr(new, "__module__", None), getattr(new, "__qualname__", None))


DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
LOSSES = Registry("loss")
METHODS = Registry("method")
DIAGNOSTICS = Registry("diagnostic")

# Modules whose import registers entries.  Kept light: heavy libraries (torchvision, timm,
# matplotlib) are imported inside the factories that use them, never at registration time.
PLUGIN_MODULES = (
    "benchmark.data.embedded",
    "benchmark.data.torchvision_sets",
    "benchmark.data.celeba",
    "benchmark.data.folder",
    "benchmark.data.fake",
    "benchmark.models.resnet_cifar",
    "benchmark.models.wideresnet",
    "benchmark.models.densenet",
    "benchmark.models.timm_backbone",
    "benchmark.losses",
    "benchmark.methods",
    "benchmark.diagnostics",
    "baselines",
)
# Other installed packages add entries through this entry-point group: each entry point names
# a module whose import registers them (README: "Adding your own method, ...").
PLUGIN_GROUP = "eos_benchmark.plugins"
_loaded = False
_failed_plugins: dict[str, str] = {}  # entry-point name -> the error its import raised


def load_plugins() -> None:
    """Import the built-in modules, then every module of the ``eos_benchmark.plugins`` entry
    points (once per process).  A plugin that fails to import costs only its own entries: one
    warning line on stderr, and an unknown-name error that names it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as err:  # whatever a third party's import raises, the suite goes on
            error = f"{type(err).__name__}: {err}".splitlines()[0]
            _failed_plugins[entry.name] = error
            print(f"warning: plugin '{entry.name}' ({entry.value}) failed to import and is "
                  f"left out: {error}", file=sys.stderr)


def reload_plugins() -> None:
    """Look for plugins again, e.g. after installing one in this process (tests do).  Modules
    already imported are not imported twice."""
    global _loaded
    _loaded = False
    _failed_plugins.clear()
    load_plugins()
