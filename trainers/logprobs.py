"""Logprobs and entropy of sampled tokens, computed only where needed and in bounded memory.

ALGORITHMS.md §0.2: logits are divided by the sampling temperature, log-softmax is taken in fp32, and
the logit at position p scores the token at p+1. The model's backbone runs once to hidden states
[B, T, H]; only positions whose *next* token is a loss token go through the LM head (prompt positions
never do), in chunks of `chunk_tokens` positions. With gradients on, each chunk is recomputed in the
backward pass (activation checkpointing), so at most one [chunk, V] fp32 block is alive at a time
instead of [B, T, V]: memory grows with B x T x H, not B x T x V.

Output alignment matches `RolloutBatch.sampling_logprobs`: out[i, t] scores input_ids[i, t], 0 where
loss_mask is False.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack returning hidden states, LM head module) of a causal LM, PEFT-wrapped or not.
    The head is called as a module, so a bias or an adapter on it is honoured."""
    from transformers import PreTrainedModel

    get_base: Callable[[], torch.nn.Module] | None = getattr(model, "get_base_model", None)  # PEFT's unwrapping
    base = get_base() if get_base is not None else model
    assert isinstance(base, PreTrainedModel), f"{type(base).__name__} is not a transformers model"
    head = base.get_output_embeddings()
    assert head is not None, f"{type(base).__name__} has no LM head"
    return base.get_decoder(), head


def _chunk_scores(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                  with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([K] log softmax(head(hidden) / T)[target], [K] entropy or zeros) in fp32; hidden [K, H], targets [K].

    Entropy H = log Z - E_p[logit] uses detached logits: it is a metric, saves nothing for backward,
    and recomputing it in the checkpointed backward costs a softmax, not another [K, H] x [H, V] matmul.
    """
    logits = head(hidden).float() / temperature  # [K, V] fp32, the only vocab-sized block
    logz = torch.logsumexp(logits, dim=-1)  # [K]
    logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logz  # [K]
    if not with_entropy:
        return logp, torch.zeros_like(logz.detach())
    detached = logits.detach()
    return logp, logz.detach() - (torch.softmax(detached, dim=-1) * detached).sum(-1)


def loss_positions(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose logits score a loss token: token (b, c+1) is scored by (b, c)."""
    rows, cols = torch.nonzero(loss_mask[:, 1:], as_tuple=True)  # one index tensor per dim of the 2-D mask
    return rows, cols


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int = 1024,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B, T], entropy [B, T]) of each loss token given its prefix at `temperature`; 0 elsewhere.

    Entropy is that of the full temperature-scaled next-token distribution at the position that
    predicts each loss token, and carries no gradient (it is a metric). Rows are right-padded, so the
    default position ids 0..T-1 are correct.
    """
    decoder, head = backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).last_hidden_state
    rows, cols = loss_positions(loss_mask)
    return score_positions(head, hidden[rows, cols], input_ids, (rows, cols + 1), temperature, chunk_tokens,
                           with_entropy)


def score_positions(head: torch.nn.Module, selected: torch.Tensor, input_ids: torch.Tensor,
                    scored: tuple[torch.Tensor, torch.Tensor], temperature: float, chunk_tokens: int,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B, T], entropy [B, T]): the tokens input_ids[scored] scored from their predicting hidden
    states `selected` [K, H], through the LM head `chunk_tokens` positions at a time; 0 elsewhere.
    Shared by the padded forward above and the shared-prefix one (trainers/prefix_grouper.py)."""
    targets = input_ids[scored]  # [K]
    recompute = torch.is_grad_enabled()  # without grad nothing is saved for backward: no need to checkpoint
    logps, entropies = [], []
    for start in range(0, selected.shape[0], chunk_tokens):
        args = (head, selected[start:start + chunk_tokens], targets[start:start + chunk_tokens], temperature,
                with_entropy)
        lp, ent = checkpoint(_chunk_scores, *args, use_reentrant=False) if recompute else _chunk_scores(*args)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logp)
    if logps:
        logp = logp.index_put(scored, torch.cat(logps))
        entropy = entropy.index_put(scored, torch.cat(entropies).detach())
    return logp, entropy
