"""Finding reward functions: a registry name, `package.module:fn`, or `path/to/file.py:fn`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from rl.errors import UserError
from rl.registries import REWARDS


def load_function(name: str | None, import_path: str | None) -> Callable[..., Any]:
    if name is not None:
        return REWARDS.get(name)
    assert import_path is not None
    target, _, attr = import_path.rpartition(":")
    module = _load_file(target) if target.endswith(".py") else _import(target, import_path)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward {import_path!r}: {target} has no function {attr!r}; check the name after the colon.")
    return fn


def _import(module: str, import_path: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"reward {import_path!r}: cannot import {module!r} ({exc}); install it or give a file path "
                        "like 'my_rewards.py:fn'.") from None


def _load_file(path: str) -> Any:
    file = Path(path)
    name = f"rlpost_user_reward_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"reward file {path} cannot be loaded as Python; check the path.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported as the user's problem
        raise UserError(f"reward file {path} failed to import: {type(exc).__name__}: {exc}. Fix the file.") from None
    sys.modules[name] = module
    return module
