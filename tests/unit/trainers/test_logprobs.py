import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from trainer_testlib import build_batch, build_lm

from trainers.logprobs import token_logprobs


def naive_logprobs(model, batch, temperature):
    """The textbook computation: full [B, T, V] fp32 logits, shift by one."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    entropy = -(torch.softmax(logits[:, :-1], -1) * torch.log_softmax(logits[:, :-1], -1)).sum(-1)
    pad = torch.zeros(batch.input_ids.shape[0], 1)
    mask = batch.loss_mask.float()
    return torch.cat([pad, logp], 1) * mask, torch.cat([pad, entropy], 1) * mask


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 3), (1.3, 1)])
def test_matches_full_logits_with_shift_temperature_and_gradients(temperature, chunk):
    model = build_lm()
    batch = build_batch([3, 5, 2], [4, 2, 6], group_size=3)
    ref_lp, ref_ent = naive_logprobs(model, batch, temperature)
    ref_grad = torch.autograd.grad(ref_lp.sum(), model.lm_head.weight)[0]
    lp, ent = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, temperature,
                             chunk_tokens=chunk, with_entropy=True)
    grad = torch.autograd.grad(lp.sum(), model.lm_head.weight)[0]
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    assert torch.equal(lp[~batch.loss_mask], torch.zeros(int((~batch.loss_mask).sum())))  # 0 off the mask
    assert not ent.requires_grad


def test_only_loss_positions_go_through_the_lm_head():
    model = build_lm()
    batch = build_batch([30, 30], [2, 3], group_size=2)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_tokens=2)
    handle.remove()
    assert seen == [2, 2, 1]  # 5 loss tokens in chunks of 2; the 60 prompt positions never


def _peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor memory during `fn`, from the profiler's allocation/free events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def test_peak_memory_grows_with_hidden_size_not_vocab():
    """Forward + backward peak memory with 2 and 8 rows of 64 completion tokens: the naive computation's grows
    by about the fp32 logits of 6 more rows (6 x 68 x V x 4 bytes); the chunked one's by far less (hidden
    states and activations only). The naive control proves the instrument sees the allocations. (Rows, not
    length, vary: eager attention's [B, heads, T, T] scores would add a quadratic term unrelated to logits.)"""
    vocab, length = 32768, 64
    model = build_lm(vocab=vocab, hidden=32)
    torch.set_num_threads(1)

    def peak(rows: int, naive: bool) -> int:
        batch = build_batch([4] * rows, [length] * rows, group_size=rows, vocab=vocab)

        def run():
            if naive:
                lp, _ = naive_logprobs(model, batch, 1.0)
            else:
                lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                       chunk_tokens=32, with_entropy=True)
            lp.sum().backward()
        return _peak_cpu_bytes(run)

    logits_growth = 6 * (4 + length) * vocab * 4  # fp32 [8 - 2 rows, T, V]
    naive_growth = peak(8, True) - peak(2, True)
    chunked_growth = peak(8, False) - peak(2, False)
    assert naive_growth > logits_growth  # the control: full logits are seen
    assert chunked_growth < logits_growth / 10, (chunked_growth, logits_growth)
