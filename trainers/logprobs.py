"""Logprobs and entropy of sampled tokens, computed only where needed and in bounded memory.

ALGORITHMS.md §0.2: logits are divided by the sampling temperature, log-softmax is taken in fp32, and
the logit at position p scores the token at p+1. Only positions whose *next* token is a loss token
go through the LM head (prompt positions never do), and they go in chunks of `chunk_tokens`; with
gradients on, each chunk is recomputed in the backward pass (activation checkpointing), so at most
one [chunk, vocab] fp32 block exists at a time instead of [batch, length, vocab].
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack returning hidden states, LM head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _chunk_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.t()).float() / temperature  # [K, V] fp32
    logz = torch.logsumexp(logits, dim=-1)  # [K]
    logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logz  # [K]
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits.detach(), dim=-1)
    entropy = logz.detach() - (probs * logits.detach()).sum(-1)  # H = log Z - E_p[logit]
    return logp, entropy


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int = 1024,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B, T], entropy [B, T]) of each loss token given its prefix; 0 elsewhere.

    Entropy is of the full (temperature-scaled) next-token distribution and carries no gradient.
    """
    decoder, head = backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).last_hidden_state
    rows, cols = torch.nonzero(loss_mask[:, 1:], as_tuple=True)  # token (b, c+1) is scored by position (b, c)
    selected = hidden[rows, cols]  # [K, H]
    targets = input_ids[rows, cols + 1]  # [K]
    weight = head.weight
    grad = torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, selected.shape[0], chunk_tokens):
        args = (selected[start:start + chunk_tokens], weight, targets[start:start + chunk_tokens], temperature,
                with_entropy)
        lp, ent = checkpoint(_chunk_scores, *args, use_reentrant=False) if grad else _chunk_scores(*args)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logp)
    if logps:
        logp = logp.index_put((rows, cols + 1), torch.cat(logps))
        entropy = entropy.index_put((rows, cols + 1), torch.cat(entropies).detach())
    return logp, entropy
