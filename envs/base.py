"""Shared env helpers: rendering chat prompts once, and deterministic splits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rl.types import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None, prompt_id: str,
                  meta: Mapping[str, object]) -> Prompt:
    """Apply the model's chat template once; the token ids travel with the prompt from here on.

    `meta` reaches the rewards as keyword arguments, with `question` (the user text) added. A custom env
    (rl.config.data.CustomEnv) builds its prompts with this."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a template: plain text
        text = (system + "\n\n" if system else "") + user + "\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # transformers types apply_chat_template's result as text or ids; tokenize=False returns the text
    return Prompt(prompt_id=prompt_id, text=text,  # type: ignore[arg-type]
                  token_ids=ids, meta={"question": user, **meta})


def stable_id(*parts: object) -> str:
    """A short id that depends only on the content (stable across runs and machines)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]
