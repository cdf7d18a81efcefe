"""Finding reward functions: a registry name, `package.module:fn`, or `path/to/file.py:fn` (rl/plugins.py)."""

from __future__ import annotations

from collections.abc import Callable

from rl.errors import UserError
from rl.plugins import load_object
from rl.registries import REWARDS


def load_function(name: str | None, import_path: str | None) -> Callable[..., object]:
    """The built-in reward `name`, or the user's callable at `import_path` (its signature is the reward contract:
    completion and prompt fields as keyword arguments, checked by calling, not here)."""
    if name is not None:
        return REWARDS.get(name)
    assert import_path is not None
    fn = load_object(import_path, "reward")
    if not callable(fn):
        raise UserError(f"reward {import_path!r} is a {type(fn).__name__}, not a function; check the name after "
                        "the colon.")
    return fn
