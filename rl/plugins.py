"""Loading user code named by `import_path` (`package.module:attr` or `path/to/file.py:attr`).

One loader for every plug-in family (rewards, and the `custom` loss, advantage and env variants), so a
bad path, a missing attribute or a wrong signature gives the same clear `UserError` (exit 2 at the CLI).
Hand-written on importlib because the two forms (module path, file path) and the error messages are the
whole job; no library does less.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from rl.errors import UserError


def split_import_path(import_path: str) -> tuple[str, str]:
    """('package.module' or 'file.py', 'attr'), or a UserError saying what the form must be."""
    target, sep, attr = import_path.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UserError(f"import_path {import_path!r} must look like 'package.module:name' or 'file.py:name'")
    return target, attr


def load_object(import_path: str, what: str) -> object:
    """The attribute `import_path` names; `what` (e.g. "reward", "custom loss") words the errors."""
    target, attr = split_import_path(import_path)
    module = _load_file(target, what) if target.endswith(".py") else _import(target, import_path, what)
    if not hasattr(module, attr):
        raise UserError(f"{what} {import_path!r}: {target} defines no {attr!r}; check the name after the colon.")
    return getattr(module, attr)


def load_callable(import_path: str, what: str, arguments: tuple[str, ...]) -> Callable[..., object]:
    """A callable that accepts the positional `arguments` (by name, for the message), checked without calling."""
    obj = load_object(import_path, what)
    if not callable(obj):
        raise UserError(f"{what} {import_path!r} is a {type(obj).__name__}, not a function or class.")
    check_signature(obj, arguments, f"{what} {import_path!r}")
    return obj


def check_signature(fn: Callable[..., object], arguments: tuple[str, ...], what: str) -> None:
    """A UserError unless `fn(*arguments)` binds (positional parameters in that order)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check before the first call
    try:
        signature.bind(*arguments)
    except TypeError as exc:
        raise UserError(f"{what} must accept ({', '.join(arguments)}) but its signature is {fn.__name__}{signature} "
                        f"({exc}); change its parameters.") from None


def _import(module: str, import_path: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"{what} {import_path!r}: cannot import {module!r} ({exc}); install it or give a file path "
                        "like 'my_file.py:name'.") from None


def _load_file(path: str, what: str) -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} file {path} does not exist; give a path relative to where rl runs, or absolute.")
    name = f"rlpost_user_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"{what} file {path} cannot be loaded as Python; check the path.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported as the user's problem
        raise UserError(f"{what} file {path} failed to import: {type(exc).__name__}: {exc}. Fix the file.") from None
    sys.modules[name] = module
    return module
