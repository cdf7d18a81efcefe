"""Name -> implementation registries for every plug-in family.

A registry knows which modules hold its built-in entries and imports them on first lookup, so
`rl --help` stays instant and a package never has to import another to be found. A family that accepts
user code has a `custom` variant: `resolve("custom", import_path)` loads it (rl/plugins.py) and turns it
into an entry with the registry's `custom` adapter, which also checks it (a clear error, never a traceback).

    LOSSES = Registry("loss", builtin_modules=("trainers.losses",))

    @LOSSES.register("gspo")
    def gspo_loss(...): ...

    LOSSES.get("gsop")   # UnknownNameError: unknown loss 'gsop'; did you mean 'gspo'? known: ...
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from pydantic import BaseModel

from rl.errors import UnknownNameError, UserError

T = TypeVar("T")

CUSTOM = "custom"
"""The variant name of user code given by `import_path` (a config's `custom` section)."""


class Registry(Generic[T]):
    """A small, explicit map from names to implementations of one kind."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = (),
                 custom: Callable[[str], T] | None = None) -> None:
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._custom = custom  # import_path -> entry (loads and checks user code); None: no custom variant
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering `obj` under `name`; a name can be taken only once."""

        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def get(self, name: str) -> T:
        """The entry named `name`, or an error listing the known names."""
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    @property
    def accepts_custom(self) -> bool:
        """Whether the family has a `custom` variant (user code by `import_path`)."""
        return self._custom is not None

    @property
    def builtin_modules(self) -> tuple[str, ...]:
        """The modules that register the built-in entries (tests/unit/rl/test_variants.py checks them)."""
        return self._builtin_modules

    def resolve(self, name: str, import_path: str | None = None) -> T:
        """`get(name)`, or for `custom` the user's entry loaded from `import_path` and checked."""
        if name != CUSTOM:
            return self.get(name)
        if self._custom is None:
            raise UserError(f"{self.kind} has no custom variant; use one of: {', '.join(self.names())}.")
        if not import_path:
            raise UserError(f"a custom {self.kind} needs import_path: 'package.module:name' or 'file.py:name'")
        return self._custom(import_path)

    def entry_for(self, cfg: BaseModel) -> T:
        """The entry a config section selects: its `custom` code, or the built-in its `name` names."""
        from rl.config.base import CustomSection

        if isinstance(cfg, CustomSection):
            return self.resolve(CUSTOM, cfg.import_path)
        return self.get(str(cfg.model_dump(include={"name"})["name"]))

    def unknown_message(self, name: object) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Known: {', '.join(known) or '(none)'}."
