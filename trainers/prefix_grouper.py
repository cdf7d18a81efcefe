"""Prefix Grouper: the shared-prefix forward (arXiv 2506.05433; ALGORITHMS.md §4).

The G completions of one group share their prompt. The padded forward encodes `[P; R_i]` G times; here
each group becomes ONE packed row `[P; R_1; R_2; ...; R_G]` so the prompt is encoded once:

    packed tokens   p0 p1 p2 | a0 a1 | b0 b1 b2        (P = 3, R_1 = a, R_2 = b)
    position_ids     0  1  2 |  3  4 |  3  4  5        every completion restarts at P (§4.4)
    segment          0  0  0 |  1  1 |  2  2  2        0 = prompt, j = completion j, -1 = padding

A query may attend a key iff the key is not after it in the packed row and the key is in the prompt or in
the query's own segment: the prompt attends causally to itself, completion j to the whole prompt and
causally to itself, never to another completion (§4.3). This is given to the model as a 4D boolean mask
(transformers passes a prepared 4D mask through to the attention kernel unchanged) with the positions
above, so every completion token sees exactly the keys, values and rotary positions it sees in the padded
forward: logprobs and gradients are the same up to float rounding. (The paper splits attention into a
prefix call and G suffix calls instead of one masked call; the masked call spends attention FLOPs on the
blocks between completions, but the projections and MLPs - most of the work - run on P + sum|R_i| tokens
instead of G*P + sum|R_i|.)

The first token of every completion is predicted by the LAST PROMPT position (§4.5): that hidden state is
gathered once per completion, so its LM-head gradient is the sum over the group, exactly as the G padded
copies accumulate it. Only positions that score a loss token go through the LM head (trainers/logprobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.errors import UserError
from trainers.logprobs import backbone_and_head, loss_positions, score_positions

MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take a prepared 4D mask as is


@dataclass(frozen=True)
class PackedGroups:
    """The packed layout of a batch and where each original position went.

    input_ids / position_ids / segment: [R, L] (R packed rows, one per group); packed_row / packed_col:
    [N, T], the packed place of original token (b, t) (-1 on padding); prompt positions of a group's
    rows all map to the same packed place.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    packed_row: torch.Tensor
    packed_col: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """[R, 1, L, L] bool, True where query (dim 2) may attend key (dim 3). Padding queries see the
        prompt and earlier padding: never an empty row (no NaN), and nothing reads their output."""
        length = self.segment.shape[1]
        idx = torch.arange(length, device=self.segment.device)
        causal = idx.unsqueeze(1) >= idx.unsqueeze(0)  # [L, L]
        seg_q, seg_k = self.segment.unsqueeze(2), self.segment.unsqueeze(1)  # [R, L, 1], [R, 1, L]
        return (causal & ((seg_k == 0) | (seg_k == seg_q))).unsqueeze(1)


def find_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                group_ids: torch.Tensor) -> list[list[int]]:
    """Rows that share a prompt, in first-appearance order: same group id AND identical prompt tokens
    (checked, not assumed, so a batch that breaks the contract is only slower, never wrong)."""
    groups: dict[tuple, list[int]] = {}
    ids, lengths, gids = input_ids.cpu(), prompt_lengths.tolist(), group_ids.tolist()
    real = attention_mask.sum(1).tolist()
    for row in range(ids.shape[0]):
        prompt = min(int(lengths[row]), int(real[row]))
        groups.setdefault((gids[row], tuple(ids[row, :prompt].tolist())), []).append(row)
    return list(groups.values())


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                group_ids: torch.Tensor, pad_token_id: int = 0) -> PackedGroups:
    """The packed layout of right-padded rows `[prompt][completion][pad]` (`RolloutBatch` convention)."""
    n, t = input_ids.shape
    groups = find_groups(input_ids, attention_mask, prompt_lengths, group_ids)
    real = attention_mask.sum(1).tolist()
    prompts = [min(int(prompt_lengths[g[0]]), int(real[g[0]])) for g in groups]
    widths = [p + sum(int(real[r]) - p for r in g) for g, p in zip(groups, prompts)]
    rows, length = len(groups), max(widths)
    dev = input_ids.device
    packed_ids = torch.full((rows, length), pad_token_id, dtype=torch.long, device=dev)
    positions = torch.zeros(rows, length, dtype=torch.long, device=dev)
    segment = torch.full((rows, length), -1, dtype=torch.long, device=dev)
    packed_row = torch.full((n, t), -1, dtype=torch.long, device=dev)
    packed_col = torch.full((n, t), -1, dtype=torch.long, device=dev)
    for g, (members, prompt) in enumerate(zip(groups, prompts)):
        packed_ids[g, :prompt] = input_ids[members[0], :prompt]
        positions[g, :prompt] = torch.arange(prompt, device=dev)
        segment[g, :prompt] = 0
        offset = prompt
        for j, row in enumerate(members, start=1):
            size = int(real[row]) - prompt
            packed_ids[g, offset:offset + size] = input_ids[row, prompt:prompt + size]
            positions[g, offset:offset + size] = torch.arange(prompt, prompt + size, device=dev)
            segment[g, offset:offset + size] = j
            packed_row[row, : prompt + size] = g
            packed_col[row, :prompt] = torch.arange(prompt, device=dev)
            packed_col[row, prompt:prompt + size] = torch.arange(offset, offset + size, device=dev)
            offset += size
    return PackedGroups(packed_ids, positions, segment, packed_row, packed_col)


def check_supported(model: torch.nn.Module) -> None:
    """Fail fast where the packed forward would silently differ from the padded one."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_ATTENTION:
        raise UserError(f"trainer.shared_prefix needs attention that accepts a custom 4D mask ({MASKED_ATTENTION}); "
                        f"the model uses {impl!r}. Load it with attn_implementation='sdpa' or set "
                        "trainer.shared_prefix: false.")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UserError(f"trainer.shared_prefix supports full causal attention only; this model has layers of "
                        f"type {sorted(layer_types)} (sliding window / linear attention, ALGORITHMS.md §4.6). "
                        "Set trainer.shared_prefix: false.")


def _mask_for(model: torch.nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA takes the boolean mask; eager attention adds the mask to the scores, so it gets 0 / -inf-ish."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def shared_prefix_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           loss_mask: torch.Tensor, prompt_lengths: torch.Tensor, group_ids: torch.Tensor,
                           temperature: float = 1.0, chunk_tokens: int = 1024,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `trainers.logprobs.token_logprobs` (same outputs [B, T], same alignment) that encodes
    each group's prompt once. `prompt_lengths` and `group_ids` are `RolloutBatch`'s [B] fields."""
    decoder, head = backbone_and_head(model)
    check_supported(decoder)
    packed = pack_groups(input_ids, attention_mask, prompt_lengths.to(input_ids.device),
                         group_ids.to(input_ids.device))
    dtype = next(decoder.parameters()).dtype
    hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids,
                     attention_mask=_mask_for(decoder, packed.attention_mask(), dtype),
                     use_cache=False).last_hidden_state  # [R, L, H]
    rows, cols = loss_positions(loss_mask)  # token (b, c + 1) is scored by the hidden state at (b, c)
    # (b, prompt - 1) maps to the group's one last-prompt position: shared by all its completions (§4.5).
    selected = hidden[packed.packed_row[rows, cols], packed.packed_col[rows, cols]]  # [K, H]
    return score_positions(head, selected, input_ids, (rows, cols + 1), temperature, chunk_tokens, with_entropy)
