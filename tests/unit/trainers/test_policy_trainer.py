import copy
import io

import pytest
import torch
from trainer_testlib import assert_same_updates, build_lm, record_updates

from rl.config.adapters import LoRAAdapter
from rl.config.algorithm import AlgorithmConfig
from rl.config.job import TrainerConfig
from trainers.logprobs import token_logprobs
from trainers.policy import NonFiniteError, PolicyTrainer
from trainers.reference import AdapterDisabledReference, FrozenCopyReference
from trainers.schedule import lr_factor

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]


def make(model, algorithm=None, reference=None, **trainer):
    # A job resolves `correction.level: auto` (rl/config/job.py); these trainers sample nothing: none unless set.
    algo = AlgorithmConfig.model_validate({"correction": {"level": "none"}, **(algorithm or {})})
    if algo.aggregation.name == "constant" and algo.aggregation.max_length is None:  # a job sets C = max_new_tokens
        algo = algo.model_copy(update={"aggregation": algo.aggregation.model_copy(update={"max_length": 8})})
    cfg = TrainerConfig.model_validate({"lr": 1e-2, "max_steps": 10, **trainer})
    return PolicyTrainer(model, algo, cfg, temperature=1.0, device="cpu", reference=reference)


def grads_after_step(batch, micro_batch_tokens, algorithm, **trainer):
    model = build_lm()
    metrics = make(model, algorithm=algorithm, micro_batch_tokens=micro_batch_tokens, **trainer).step(batch)
    # Compare accumulated gradients, not Adam's first update: it divides by |g| and would amplify rounding.
    return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("algorithm", [{"aggregation": {"name": a}} for a in AGGREGATIONS] + [
    {"loss": {"name": "gspo"}, "aggregation": {"name": "seq_mean_token_mean"}, "kl": {"coef": 0.1},
     "correction": {"level": "sequence", "cap": 5.0}},
    {"loss": {"name": "gspo_token"}, "kl": {"coef": 0.1, "estimator": "k1"}, "correction": {"level": "token"}},
], ids=[*AGGREGATIONS, "gspo+kl+seq_tis", "gspo_token+k1+tis"])
def test_gradient_accumulation_one_micro_batch_of_8_equals_8_of_1(uneven_batch, algorithm):
    one, m1 = grads_after_step(uneven_batch, 10_000, algorithm)
    many, m8 = grads_after_step(uneven_batch, 1, algorithm)  # budget below every row: 8 micro-batches of 1
    worst = max(float((one[k] - many[k]).abs().max()) for k in one)
    assert worst < 1e-6, worst
    assert max(float(g.abs().max()) for g in one.values()) > 1e-3  # a real, non-zero gradient
    for key in ("loss", "grad_norm", "policy/entropy", "kl", "ratio_mean", "policy/mismatch_kl"):
        assert m1[key] == pytest.approx(m8[key], rel=1e-5, abs=1e-7), key


def test_accumulation_matches_across_several_updates(uneven_batch):
    """With old logprobs precomputed per mini-batch (2 epochs x 2 mini-batches) the gradient of each of the four
    updates does not depend on the micro-batch packing either (compared before AdamW, which turns float32
    rounding of near-zero gradient entries into ~1e-6 weight differences: trainer_testlib.record_updates)."""
    updates = []
    for budget in (10_000, 1):
        trainer = make(build_lm(), micro_batch_tokens=budget, ppo_epochs=2, mini_batches=2, lr=1e-3)
        updates.append(record_updates(trainer))
        trainer.step(uneven_batch)
    assert len(updates[0]) == 4
    assert_same_updates(*updates, rtol=1e-5)


def test_old_logprobs_are_computed_once_before_any_update_and_ratios_move(uneven_batch):
    trainer = make(build_lm(), ppo_epochs=3, mini_batches=2, lr=0.05)
    seen = []
    original = trainer._batch_logprobs
    trainer._batch_logprobs = lambda model, b: seen.append(trainer.updates) or original(model, b)
    metrics = trainer.step(uneven_batch)
    assert seen == [0, 0]  # one pass per mini-batch, both before the first update
    assert metrics["train/updates"] == 6
    assert metrics["ratio_max"] > 1.0 and metrics["clip_frac_high"] + metrics["clip_frac_low"] > 0


def test_a_single_update_has_ratio_one_and_no_clipping(uneven_batch):
    metrics = make(build_lm()).step(uneven_batch)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["ratio_max"] == pytest.approx(1.0)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
    assert metrics["train/updates"] == 1 and metrics["lr"] == pytest.approx(1e-2)
    assert metrics["policy/entropy"] > 0 and metrics["train/tokens_per_s"] > 0


def test_step_raises_logprob_of_positive_advantage_completions(uneven_batch):
    model = build_lm()

    def seq_logp():
        with torch.no_grad():
            lp, _ = token_logprobs(model, uneven_batch.input_ids, uneven_batch.attention_mask, uneven_batch.loss_mask)
        return lp.sum(1)

    before = seq_logp()
    make(model, lr=1e-3).step(uneven_batch)
    delta = seq_logp() - before
    adv = uneven_batch.advantages
    assert delta[adv > 0].min() > 0 > delta[adv < 0].max()


def test_nonfinite_loss_skips_the_update_then_stops(uneven_batch):
    model = build_lm()
    trainer = make(model, max_nonfinite_steps=2)
    before = copy.deepcopy(model.state_dict())
    poisoned = uneven_batch.with_advantages(torch.full((8,), float("nan")))
    metrics = trainer.step(poisoned)
    assert metrics["train/skipped_nonfinite"] == 1 and metrics["train/updates"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NonFiniteError, match="consecutive"):
        trainer.step(poisoned)


def test_resume_from_state_dict_is_bit_exact(uneven_batch):
    """Two steps straight == one step, checkpoint (serialised), fresh objects, load, one more step."""
    kwargs = dict(lr=1e-3, warmup_steps=2, lr_schedule="cosine", ppo_epochs=2, weight_decay=0.1)
    straight = make(build_lm(), **kwargs)
    straight.step(uneven_batch)
    straight.step(uneven_batch)

    interrupted = make(build_lm(), **kwargs)
    interrupted.step(uneven_batch)
    buffer = io.BytesIO()
    torch.save({"model": interrupted.model.state_dict(), "trainer": interrupted.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = build_lm(seed=123)  # a different init: everything must come from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model, **kwargs)
    resumed.load_state_dict(saved["trainer"])
    resumed.step(uneven_batch)
    for (name, a), b in zip(straight.model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    assert resumed.updates == straight.updates == 4
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_no_reference_without_kl_and_a_frozen_copy_for_full_fine_tuning(uneven_batch):
    assert make(build_lm()).reference is None
    model = build_lm()
    initial = copy.deepcopy(model)
    trainer = make(model, algorithm={"kl": {"coef": 0.5}})
    assert isinstance(trainer.reference, FrozenCopyReference)
    trainer.step(uneven_batch)
    trainer.step(uneven_batch)
    with torch.no_grad():
        expected, _ = token_logprobs(initial, uneven_batch.input_ids, uneven_batch.attention_mask,
                                     uneven_batch.loss_mask)
    assert torch.allclose(trainer.reference.logprobs(uneven_batch), expected, atol=1e-6)
    assert trainer.step(uneven_batch)["kl"] > 0  # the policy moved away from the reference


def test_with_an_adapter_the_reference_is_the_base_model_without_a_copy(uneven_batch):
    from trainers.adapters import apply_adapter

    base = build_lm()
    with torch.no_grad():
        expected, _ = token_logprobs(base, uneven_batch.input_ids, uneven_batch.attention_mask, uneven_batch.loss_mask)
    model = apply_adapter(base, LoRAAdapter(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = make(model, algorithm={"kl": {"coef": 0.5}}, lr=0.05)
    assert isinstance(trainer.reference, AdapterDisabledReference) and trainer.reference.model is model
    assert {n for n, _ in trainer.trainable_named_parameters()} == {
        n for n, p in model.named_parameters() if "lora_" in n}
    trainer.step(uneven_batch)
    metrics = trainer.step(uneven_batch)
    assert metrics["kl"] > 0  # the adapter changed the policy ...
    assert torch.allclose(trainer.reference.logprobs(uneven_batch), expected, atol=1e-6)  # ... not the reference


def test_a_caller_supplied_reference_is_used(uneven_batch):
    class Fixed:
        calls = 0

        def logprobs(self, batch):
            Fixed.calls += 1
            return batch.sampling_logprobs

    metrics = make(build_lm(), algorithm={"kl": {"coef": 0.1, "estimator": "k1"}}, reference=Fixed()).step(uneven_batch)
    assert Fixed.calls == 1 and metrics["kl"] != 0


def test_token_correction_reports_the_sampler_mismatch_and_its_weights(uneven_batch):
    metrics = make(build_lm(), algorithm={"correction": {"level": "token"}}).step(uneven_batch)
    assert metrics["policy/mismatch_kl"] > 0.1  # synthetic sampler logprobs disagree with the model
    assert metrics["policy/tis_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    assert make(build_lm()).step(uneven_batch)["policy/tis_weight_mean"] == 1.0  # level none: no weights


def test_an_unresolved_auto_correction_is_refused():
    with pytest.raises(ValueError, match="auto"):
        make(build_lm(), algorithm={"correction": {"level": "auto"}})


def sampler_disagreeing(batch, model, seed=1):
    """`batch` with sampling logprobs = the model's own + a per-token offset in [-1, 1] (a sampler off by up
    to e^1 per token, as a stale copy or another engine can be)."""
    with torch.no_grad():
        learner, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    offset = (torch.rand(learner.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * batch.loss_mask
    return batch.replace(sampling_logprobs=(learner + offset) * batch.loss_mask)


def hand_weighted_gradient(batch, level, cap):
    """The gradient of -(1/N_tok) sum_t w_t A_t log pi(y_t) (ppo_clip at ratio 1, token_mean) with
    w = min(pi / pi_sampler, cap) per token, or min(prod_t pi / pi_sampler, cap) per sequence."""
    model = build_lm()
    logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    mask = batch.loss_mask.float()
    log_w = (logp.detach() - batch.sampling_logprobs) * mask
    if level == "sequence":
        log_w = log_w.sum(1, keepdim=True)
    w = {"none": torch.ones_like(log_w), "token": torch.minimum(log_w.exp(), torch.tensor(cap)),
         "sequence": torch.minimum(log_w.exp(), torch.tensor(cap))}[level]
    loss = -(w * batch.advantages.unsqueeze(1) * logp * mask).sum() / mask.sum()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mismatch_weights_scale_the_gradient_as_the_weighted_estimator(uneven_batch, level):
    """The trainer's update is the truncated-IS policy gradient: each token (sequence) weighted by
    min(pi_learner / pi_sampler, cap). Deleting the TIS multiplication makes the trainer's gradient the
    unweighted one, which this test tells apart."""
    batch = sampler_disagreeing(uneven_batch, build_lm())

    def trainer_gradient(correction):
        model = build_lm()
        make(model, algorithm={"correction": {"level": correction, "cap": 2.0}}, max_grad_norm=1e9).step(batch)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    weighted, plain = trainer_gradient(level), trainer_gradient("none")
    expected = hand_weighted_gradient(batch, level, 2.0)
    scale = float(expected.abs().max())
    assert float((weighted - expected).abs().max()) < 1e-5 * scale
    assert float((plain - hand_weighted_gradient(batch, "none", 2.0)).abs().max()) < 1e-5 * scale
    assert float((weighted - plain).abs().max()) > 0.05 * scale  # the weights really change the update


def test_gradient_checkpointing_gives_the_same_gradients(uneven_batch):
    plain, _ = grads_after_step(uneven_batch, 10_000, {})
    checkpointed, _ = grads_after_step(uneven_batch, 10_000, {}, gradient_checkpointing=True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_learning_rate_schedule_and_weight_decay_groups():
    assert [lr_factor(u, 2, 10, "constant") for u in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(u, 2, 10, "linear") for u in (2, 6, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5) and lr_factor(10, 2, 10, "cosine") == pytest.approx(0)
    trainer = make(build_lm(), weight_decay=0.1)
    decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        assert (id(p) in decay) == (p.dim() >= 2), name


@pytest.mark.smollm2
@pytest.mark.slow
def test_a_step_on_smollm2_raises_logprob_of_positive_completions(smollm2_dir):
    """Arithmetic prompts with right (advantage > 0) and wrong (< 0) answers, full fine-tuning, one step."""
    from trainer_testlib import chat_batch

    from rl.config.algorithm import GRPOAdvantage
    from rl.models import load_causal_lm, load_tokenizer
    from trainers.advantages import grpo

    tokenizer = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir)
    batch = chat_batch(tokenizer, [("What is 3 + 4? Answer with a number.", ["7", "The answer is 7.", "9", "12"]),
                                   ("What is 6 x 2? Answer with a number.", ["12", "8", "It is 12.", "3"])])
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    batch = batch.with_rewards(rewards).with_advantages(grpo(rewards, batch.group_ids, GRPOAdvantage()))

    def seq_logp():
        with torch.no_grad():
            lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        return lp.sum(1)

    before = seq_logp()
    metrics = make(model, lr=1e-6).step(batch)
    delta = seq_logp() - before
    # One Adam step is sign-like per parameter, so single sequences may move either way; on average the
    # right answers must gain and the wrong ones lose, and the advantage-weighted change must be positive.
    assert delta[rewards > 0].mean() > 0 > delta[rewards == 0].mean(), delta
    assert float((batch.advantages * delta).sum()) > 0
    assert metrics["grad_norm"] > 0 and metrics["train/skipped_nonfinite"] == 0


def test_an_unresolved_constant_length_is_an_error_not_a_silent_default():
    algo = AlgorithmConfig.model_validate({"correction": {"level": "none"}, "aggregation": {"name": "constant"}})
    with pytest.raises(ValueError, match="max_length reached the trainer unresolved"):
        PolicyTrainer(build_lm(), algo, TrainerConfig(), temperature=1.0, device="cpu")
