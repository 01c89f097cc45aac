"""One registry type for datasets, backbones, losses and methods: register, create by name, list."""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterator

from benchmark.errors import UserError


class UnknownNameError(UserError):
    """A name that no entry of a registry carries."""


class Registry:
    """Named factories of one kind, each with a one-line description.

    ``@REG.register("name")`` decorates a class or function; ``REG.create("name", **kwargs)``
    calls it; ``REG.names()`` lists what is there.  A name ending in ":" registers a family:
    ``create("family:member", **kw)`` calls its factory as ``factory("member", **kw)``.  The description is the first line of the
    factory's docstring unless given.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Callable[..., Any], str]] = {}

    def register(self, name: str, description: str | None = None) -> Callable:
        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
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
        )

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


DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
LOSSES = Registry("loss")
METHODS = Registry("method")

# Modules whose import registers entries.  Kept light: heavy libraries (torchvision, timm,
# matplotlib) are imported inside the factories that use them, never at registration time.
PLUGIN_MODULES = (
    "benchmark.data.embedded",
    "benchmark.data.torchvision_sets",
    "benchmark.data.celeba",
    "benchmark.data.folder",
    "benchmark.models.resnet_cifar",
    "benchmark.models.wideresnet",
    "benchmark.models.densenet",
    "benchmark.models.timm_backbone",
    "benchmark.losses",
    "benchmark.methods",
    "baselines",
)
_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
