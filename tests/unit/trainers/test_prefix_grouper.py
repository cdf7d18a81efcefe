"""Prefix Grouper (ALGORITHMS.md §4.7): the packed shared-prefix forward equals the padded per-sample one."""

import dataclasses

import pytest
import torch
from trainer_testlib import assert_same_updates, build_lm, chat_batch, record_updates

import trainers.prefix_grouper as pg
from rl.batch import RolloutBatch
from rl.config.adapters import LoRAAdapter
from rl.config.algorithm import AlgorithmConfig
from rl.config.job import TrainerConfig
from rl.errors import UserError
from trainers.logprobs import token_logprobs
from trainers.microbatch import micro_batches
from trainers.policy import PolicyTrainer


def shared_batch(prompt_lengths: list[int], completion_lengths: list[list[int]], vocab: int = 64,
                 seed: int = 0) -> RolloutBatch:
    """One group per prompt; every row of a group repeats the group's prompt tokens; uneven completions."""
    g = torch.Generator().manual_seed(seed)
    rows = []  # (prompt tokens, completion tokens, group)
    for group, (p, lengths) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt = torch.randint(1, vocab, (p,), generator=g)
        rows += [(prompt, torch.randint(1, vocab, (c,), generator=g), group) for c in lengths]
    n, width = len(rows), max(len(p) + len(c) for p, c, _ in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn, loss = torch.zeros(n, width, dtype=torch.bool), torch.zeros(n, width, dtype=torch.bool)
    for i, (p, c, _) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.cat([p, c])
        attn[i, : len(p) + len(c)] = True
        loss[i, len(p): len(p) + len(c)] = True
    sampling = torch.where(loss, -torch.rand(n, width, generator=g) * 3, torch.zeros(n, width))
    rewards = torch.rand(n, generator=g)
    return RolloutBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=sampling,
        prompt_lengths=torch.tensor([len(p) for p, _, _ in rows]), group_ids=torch.tensor([r[2] for r in rows]),
        policy_version=0, finish_reasons=["stop"] * n, prompt_texts=[""] * n, completion_texts=[""] * n,
        sample_meta=[{}] * n).validate().with_rewards(rewards).with_advantages(rewards - rewards.mean())


def both_ways(model, batch, temperature=1.0, chunk=1024, params=None):
    """((logp, entropy, grads) padded, (logp, entropy, grads) grouped) with loss = sum_i A_i mean_t logp_it."""
    params = params or [p for p in model.parameters() if p.requires_grad]
    weights = batch.advantages.unsqueeze(1) / batch.loss_mask.sum(1, keepdim=True).clamp(min=1)  # [N, 1]
    out = []
    for grouped in (False, True):
        args = (model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        if grouped:
            args += (batch.prompt_lengths, batch.group_ids)
        fn = pg.shared_prefix_logprobs if grouped else token_logprobs
        logp, entropy = fn(*args, temperature=temperature, chunk_tokens=chunk, with_entropy=True)
        grads = torch.autograd.grad((logp * weights).sum(), params)
        out.append((logp.detach(), entropy, grads))
    return out


def assert_equivalent(padded, grouped, batch, logp_atol=1e-5, logp_rtol=0.0, grad_rtol=1e-4):
    """|logp, entropy difference| <= atol + rtol |value|; each gradient within grad_rtol of its largest entry."""
    for a, b in zip(padded[:2], grouped[:2]):
        assert bool(((a - b).abs() <= logp_atol + logp_rtol * a.abs()).all()), float((a - b).abs().max())
    assert torch.equal(grouped[0][~batch.loss_mask], torch.zeros(int((~batch.loss_mask).sum())))
    for a, b in zip(padded[2], grouped[2]):
        scale = float(a.abs().max())
        assert scale > 0 and float((a - b).abs().max()) <= grad_rtol * scale, (float((a - b).abs().max()), scale)


def tiny_model(which, tiny_model_dir):
    """A tiny Llama (trainer_testlib), the built-in tiny-llama, or a tiny Qwen2 (biased q/k/v projections)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.models import load_causal_lm

    if which == "testlib":
        return build_lm()
    if which == "tiny-llama":
        return load_causal_lm(tiny_model_dir)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["testlib", "tiny-llama", "qwen2"])
def test_logprobs_entropy_and_gradients_equal_the_padded_forward(tiny_model_dir, which, attention):
    model = tiny_model(which, tiny_model_dir)
    model.config._attn_implementation = attention
    batch = shared_batch([5, 9], [[4, 1, 7], [3, 6, 2]])  # 2 prompts of different lengths, G=3, uneven
    padded, grouped = both_ways(model, batch, temperature=0.7, chunk=4)
    assert_equivalent(padded, grouped, batch)
    first = batch.prompt_lengths  # the first completion token is scored at the shared last prompt position
    rows = torch.arange(len(batch))
    assert torch.allclose(grouped[0][rows, first], padded[0][rows, first], atol=1e-5)
    assert bool((grouped[0][rows, first] < 0).all())


def test_with_a_lora_adapter_gradients_of_the_adapter_match():
    from trainers.adapters import apply_adapter

    model = apply_adapter(build_lm(), LoRAAdapter(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj", "up_proj"]))
    for name, p in model.named_parameters():  # LoRA B starts at 0: give it weight so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = shared_batch([6, 4], [[5, 2, 3, 1], [7, 2, 4, 4]], seed=1)
    padded, grouped = both_ways(model, batch)
    assert len(padded[2]) == sum("lora_" in n for n, p in model.named_parameters() if p.requires_grad) > 0
    assert_equivalent(padded, grouped, batch)


def test_naive_cumsum_position_ids_break_the_equivalence(monkeypatch):
    """Guards the §4.4 positions: counting on across completions must be caught by the comparison."""
    model = build_lm()
    batch = shared_batch([5, 9], [[4, 1, 7], [3, 6, 2]])
    right = pg.shared_prefix_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                      batch.prompt_lengths, batch.group_ids)[0]
    pack = pg.pack_groups

    def naive(*args, **kwargs):
        packed = pack(*args, **kwargs)
        return dataclasses.replace(packed, position_ids=(packed.segment >= 0).long().cumsum(1) - 1)

    monkeypatch.setattr(pg, "pack_groups", naive)
    wrong = pg.shared_prefix_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                      batch.prompt_lengths, batch.group_ids)[0]
    padded = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)[0]
    assert (right - padded).abs().max() < 1e-5
    assert (wrong - padded).abs().max() > 1e-4  # 10x the equivalence bound, on a near-uniform random model


def test_a_completion_never_sees_another_completion():
    model = build_lm()
    batch = shared_batch([6], [[4, 5, 3]])
    ids = batch.input_ids.clone()
    ids[1, 6:11] = (ids[1, 6:11] + 7) % 63 + 1  # perturb completion 2 only
    logp = [pg.shared_prefix_logprobs(model, x, batch.attention_mask, batch.loss_mask, batch.prompt_lengths,
                                      batch.group_ids)[0] for x in (batch.input_ids, ids)]
    assert torch.equal(logp[0][[0, 2]], logp[1][[0, 2]])
    assert not torch.equal(logp[0][1], logp[1][1])


def test_the_prompt_is_encoded_once_and_only_loss_positions_reach_the_head():
    model = build_lm()
    batch = shared_batch([30, 20], [[2, 3, 1], [4, 4]])
    widths, heads = [], []
    h1 = model.model.embed_tokens.register_forward_hook(lambda m, i, o: widths.append(tuple(o.shape[:2])))
    h2 = model.lm_head.register_forward_hook(lambda m, i, o: heads.append(o.shape[0]))
    pg.shared_prefix_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.prompt_lengths,
                              batch.group_ids, chunk_tokens=5)
    h1.remove(), h2.remove()
    assert widths == [(2, 36)]  # 2 packed rows: 30 + 2 + 3 + 1 and 20 + 4 + 4 (padded), not 5 rows of 34
    assert heads == [5, 5, 4]  # 14 loss tokens in chunks of 5


def test_rows_of_one_group_id_with_different_prompts_are_not_merged():
    model = build_lm()
    a, b = shared_batch([5], [[3, 2]], seed=2), shared_batch([5], [[4]], seed=3)
    batch = RolloutBatch.concat([a, b]).replace(group_ids=torch.zeros(3, dtype=torch.long))
    assert pg.find_groups(batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.group_ids) == [[0, 1], [2]]
    padded, grouped = both_ways(model, batch)
    assert_equivalent(padded, grouped, batch)


def test_micro_batches_keep_whole_groups_within_the_packed_budget():
    batch = shared_batch([10, 3, 8], [[2, 2, 2], [1, 5], [6, 1, 1, 1]])
    packs = micro_batches(batch, token_budget=17, keep_groups=True)  # packed lengths 16, 9, 17
    assert [rows for rows, _ in packs] == [[5, 6, 7, 8], [0, 1, 2], [3, 4]]


def trained_updates(batch, shared_prefix, lora=False, **trainer):
    """(the gradient of each optimizer update, the step's metrics) of one trainer step on `batch`."""
    from trainers.adapters import apply_adapter

    model = build_lm()
    if lora:  # the KL reference is then the model with its adapter disabled
        model = apply_adapter(model, LoRAAdapter(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    cfg = TrainerConfig.model_validate({"lr": 1e-3, "max_steps": 4, "shared_prefix": shared_prefix, **trainer})
    algo = AlgorithmConfig.model_validate({"kl": {"coef": 0.05}, "correction": {"level": "none"}})
    trainer = PolicyTrainer(model, algo, cfg, temperature=0.9, device="cpu")
    updates = record_updates(trainer)
    return updates, trainer.step(batch)


@pytest.mark.parametrize("trainer", [{}, {"ppo_epochs": 2, "mini_batches": 2, "micro_batch_tokens": 20},
                                     {"lora": True, "ppo_epochs": 2}, {"gradient_checkpointing": True}],
                         ids=["one-update", "2x2-updates-micro-batched", "lora-2-updates", "grad-checkpointing"])
def test_trainer_step_gives_the_same_update_with_and_without_shared_prefix(trainer):
    """Every update's gradient is the padded run's up to float32 rounding: measured within 5e-7 of its largest
    entry (1 or 2 threads); a completion that sees another completion is off by more than 0.1 of it."""
    batch = shared_batch([7, 12, 5, 9], [[3, 6, 1], [5, 2, 4], [8, 3, 2], [2, 2, 7]], seed=4)
    base, m_base = trained_updates(batch, False, **trainer)
    grouped, m_grouped = trained_updates(batch, True, **trainer)
    assert_same_updates(base, grouped, rtol=1e-5)
    for key in ("loss", "grad_norm", "policy/entropy", "kl"):
        assert m_grouped[key] == pytest.approx(m_base[key], rel=1e-4, abs=1e-6), key


def test_config_defaults_off_and_unsupported_attention_fails_clearly():
    assert TrainerConfig().shared_prefix is False
    model = build_lm()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="shared_prefix"):
        PolicyTrainer(model, AlgorithmConfig(correction={"level": "none"}), TrainerConfig(shared_prefix=True),
                      temperature=1.0, device="cpu")


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_chat_groups_with_and_without_lora(smollm2_dir):
    from rl.models import load_causal_lm, load_tokenizer
    from trainers.adapters import apply_adapter

    tokenizer = load_tokenizer(smollm2_dir)
    batch = chat_batch(tokenizer, [("What is 7 + 5?", ["12", "The answer is 12.", "13"]),
                                   ("Name a colour.", ["Blue.", "Red, like a rose"])])
    batch = batch.with_advantages(torch.tensor([1.0, 0.5, -1.0, 0.3, -0.3]))
    model = load_causal_lm(smollm2_dir)
    head = model.get_output_embeddings().weight
    model.requires_grad_(False)
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[-1].mlp.down_proj.weight, head]
    for p in params:
        p.requires_grad_(True)
    # 30 fp32 layers: the padded forward itself moves by ~8e-6 between batched and one-row-at-a-time runs
    # (and by ~2e-5 between sdpa and eager), so logprobs get a 1e-5 relative term on top of 1e-5 absolute.
    assert_equivalent(*both_ways(model, batch, params=params), batch, logp_rtol=1e-5)
    model = apply_adapter(model, LoRAAdapter(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    assert_equivalent(*both_ways(model, batch), batch, logp_rtol=1e-5)


def test_episodes_with_tool_answers_inside_completions_stay_exact():
    """Multi-turn episodes (rollout/episodes.py): tool-answer tokens inside a completion are context, never loss;
    the shared-prefix forward and the trainer's updates still equal the padded ones."""
    batch = shared_batch([7, 12, 5], [[9, 6, 10], [8, 7], [10, 9, 6]], seed=5)
    loss = batch.loss_mask.clone()
    for i in range(batch.num_samples):
        start = int(batch.prompt_lengths[i]) + 2
        loss[i, start:start + 3] = False  # [turn: 2 tokens][tool answer: 3 tokens][turn ...]
    batch = dataclasses.replace(batch, loss_mask=loss,
                                sampling_logprobs=torch.where(loss, batch.sampling_logprobs, 0.0)).validate()
    padded, grouped = both_ways(build_lm(), batch)
    assert_equivalent(padded, grouped, batch)
    base, m_base = trained_updates(batch, False, ppo_epochs=2)
    shared, m_shared = trained_updates(batch, True, ppo_epochs=2)
    assert_same_updates(base, shared, rtol=1e-5)
    assert m_shared["loss"] == pytest.approx(m_base["loss"], rel=1e-4, abs=1e-6)
