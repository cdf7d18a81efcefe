"""Reward models: the one text format and the one scoring pass shared by `rl train-rm` (trainers/) and the
`reward_model` reward (rewards/), so a reward equals the trained model's own score of the same text.

A reward model scores `[user: question, assistant: completion]` rendered with its own chat template (the
policy's template and system prompt are not part of it): training pairs use their `prompt` column as the
question, rollouts their `question` field (every built-in env sets it). The score is the classifier's one
logit at the last non-pad token (transformers' sequence-classification pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def rm_text(tokenizer: PreTrainedTokenizerBase, question: str | None, completion: str) -> str:
    """The text a reward model scores (no question: the completion alone)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "user", "content": question}] if question else []) + [
            {"role": "assistant", "content": completion}]
        # transformers types apply_chat_template's result as text or ids; tokenize=False returns the text
        return tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[return-value]
    return (question + "\n" if question else "") + completion


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask; a text over `max_length` tokens loses its start (the response's end, which
    the head reads, is kept)."""
    rows = [ids[-max_length:] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] scalar scores of an encoded batch (with grad when the caller allows it)."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, 0].float()


@torch.no_grad()
def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                batch_size: int, max_length: int) -> list[float]:
    """One score per text, `batch_size` texts per forward pass."""
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        scores += rewards(model, encode(tokenizer, texts[start:start + batch_size], max_length)).tolist()
    return scores
