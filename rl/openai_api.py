"""The one place rlpost imports `openai`, an optional dependency (the `agents` extra; vLLM brings it too): the
clients of OpenAI-client agents (rollout/endpoint_rollout.py) and of the LLM judge (rewards/judge.py)."""

from __future__ import annotations

from types import ModuleType

from rl.errors import UserError


def openai_module(needed_by: str) -> ModuleType:
    """The `openai` package, or a UserError saying what needs it and how to install it."""
    try:
        import openai
    except ImportError:
        raise UserError(f"{needed_by} needs the `openai` package; install it with `pip install 'rlpost[agents]'` "
                        "(or `pip install openai`).") from None
    return openai
