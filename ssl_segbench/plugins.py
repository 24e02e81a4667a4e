"""One registry mechanism for protocols, datasets and backbone loaders.

A plugin is a class that registers itself with a decorator in the module that defines it; `Registry.discover` imports
every module of its package (`pkgutil`), so adding a plugin is adding one file, with no import list to edit. A module
that registers nothing and is not declared a shared helper is an error at discovery, so a forgotten decorator cannot
leave a plugin silently missing.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SegbenchError
from .registry import did_you_mean


class PluginError(SegbenchError):
    """A plugin package is inconsistent (an empty or twice-registered key, a module that registers nothing); the
    message names the modules and the fix."""


class Registry:
    """Classes by key (the class attribute `key`, e.g. a protocol's `name`), in registration order.

    `kind` names what it holds in messages ("protocol"), `decorator` the name its modules register with; `error` is
    the exception an unknown key raises, with the close keys and the command `listing` that lists them, then `hint`
    (another way to name one)."""

    def __init__(self, kind: str, key: str, decorator: str, error: type[Exception], listing: str, hint: str = ""):
        self.kind, self.key, self.decorator, self.error, self.listing, self.hint = \
            kind, key, decorator, error, listing, hint
        self._entries: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: file `cls` under its key, refusing an empty key or one registered twice."""
        key = getattr(cls, self.key, None)
        if not key or not isinstance(key, str):
            raise PluginError(f"{self.kind} {cls.__module__}.{cls.__qualname__} has no {self.key} (got {key!r}): "
                              f"set the class attribute {self.key}")
        if key in self._entries:
            raise PluginError(f"{self.kind} {self.key} '{key}' is registered twice: by {self._entries[key].__module__}"
                              f" and by {cls.__module__}; rename one")
        self._entries[key] = cls
        return cls

    def get(self, key: str) -> type:
        """The class registered as `key`; an unknown key is the registry's error, suggesting the close ones."""
        if key not in self._entries:
            raise self.error(f"unknown {self.kind} '{key}'.{did_you_mean(key, self.names(), self.listing)}{self.hint}")
        return self._entries[key]

    __getitem__ = get

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The keys, sorted."""
        return sorted(self._entries)

    def items(self):
        return self._entries.items()

    def discover(self, package: str, shared: Iterable[str] = ()) -> None:
        """Import every module of `package` (its `__path__`); each must register at least one class here, or be named
        in `shared` (a helper module the plugins use, not imported here; the package's `SHARED_MODULES`). A module
        that does neither, or a `shared` name that is no module of the package, is an error naming the file and the
        fix."""
        shared = set(shared)
        path = importlib.import_module(package).__path__  # the package itself may be importing: its path is set
        found = {m.name: Path(m.module_finder.path) / f"{m.name}.py" for m in pkgutil.iter_modules(path)}
        if shared - set(found):
            raise PluginError(f"{package}: shared module(s) {sorted(shared - set(found))} do not exist; modules: "
                              f"{', '.join(sorted(found))}")
        for name in sorted(set(found) - shared):
            module = importlib.import_module(f"{package}.{name}")
            if not any(cls.__module__ == module.__name__ for cls in self._entries.values()):
                raise PluginError(f"{found[name]} registers no {self.kind}. To fix it, decorate its {self.kind} class "
                                  f"with @{self.decorator}, or, if it is a helper the {self.kind}s share, add '{name}' "
                                  f"to SHARED_MODULES in {package.replace('.', '/')}/__init__.py")

