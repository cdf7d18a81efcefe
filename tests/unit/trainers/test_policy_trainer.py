import tracemalloc

import pytest
import torch

from rl.config import load_job
from rl.models import load_causal_lm
from rl.types import SamplingParams
from rollout.engine import build_engine
from trainers.advantages import grpo
from trainers.logprobs import token_logprobs
from trainers.policy import PolicyTrainer

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]


@pytest.fixture(scope="module")
def scored_batch(tiny_model_dir):
    """8 sequences (2 prompts x 4) of uneven lengths from the real HF engine, with GRPO advantages."""
    from rl.models import load_tokenizer
    from rl.runtime import build_env

    job = load_job("tiny")
    engine = build_engine(job.rollout, tiny_model_dir, "float32", "cpu", 0)
    prompts = list(build_env(job, load_tokenizer(tiny_model_dir)).train_prompts())[:2]
    batch = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=10, seed=0))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 1.0, 0.0])
    cfg = job.algorithm.advantage
    return batch.with_rewards(rewards).with_advantages(grpo(rewards, batch.group_ids, cfg))


def _updated_weights(model_dir, batch, aggregation: str, micro_tokens: int, loss: str = "ppo_clip"):
    torch.manual_seed(0)
    job = load_job("tiny", [f"algorithm.aggregation.name={aggregation}", f"algorithm.loss.name={loss}",
                            f"trainer.micro_batch_tokens={micro_tokens}", "trainer.lr=0.01"])
    model = load_causal_lm(model_dir)
    trainer = PolicyTrainer(model, job.algorithm, job.trainer, temperature=1.0, backend="hf", device="cpu",
                            max_new_tokens=job.rollout.max_new_tokens)
    metrics = trainer.step(batch)
    # The accumulated gradient is the update's direction; Adam's first step divides it by its own
    # magnitude, which would amplify fp32 rounding of near-zero entries, so compare gradients.
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, scored_batch, aggregation):
    one, m1 = _updated_weights(tiny_model_dir, scored_batch, aggregation, micro_tokens=10_000)
    many, m8 = _updated_weights(tiny_model_dir, scored_batch, aggregation, micro_tokens=1)  # 8 micro-batches of 1
    assert one.keys() == many.keys() and len(one) > 0
    worst = max(float((one[k] - many[k]).abs().max()) for k in one)
    assert worst < 1e-6, worst
    assert max(float(v.abs().max()) for v in one.values()) > 1e-3  # a real, non-zero update
    assert m1["loss"] == pytest.approx(m8["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)


def test_several_optimizer_steps_use_old_logprobs_and_clip(tiny_model_dir, scored_batch):
    torch.manual_seed(0)
    job = load_job("tiny", ["trainer.ppo_epochs=3", "trainer.mini_batches=2", "trainer.lr=0.05"])
    model = load_causal_lm(tiny_model_dir)
    trainer = PolicyTrainer(model, job.algorithm, job.trainer, 1.0, "hf", "cpu", 8)
    metrics = trainer.step(scored_batch)
    assert metrics["train/updates"] == 6
    assert metrics["ratio_max"] > 1.0  # later updates see a policy that moved away from pi_old


def test_nonfinite_loss_skips_the_update_then_stops(tiny_model_dir, scored_batch):
    job = load_job("tiny", ["trainer.max_nonfinite_steps=2"])
    model = load_causal_lm(tiny_model_dir)
    trainer = PolicyTrainer(model, job.algorithm, job.trainer, 1.0, "hf", "cpu", 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = scored_batch.with_advantages(torch.full((8,), float("nan")))
    metrics = trainer.step(poisoned)
    assert metrics["train/skipped_nonfinite"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from trainers.policy import NonFiniteError

    with pytest.raises(NonFiniteError, match="consecutive"):
        trainer.step(poisoned)


def test_logprob_memory_grows_with_chunk_not_with_vocab_times_length(tiny_model_dir):
    """Peak allocation of the logprob pass with gradients: a [tokens, vocab] fp32 block must never exist."""
    model = load_causal_lm(tiny_model_dir)
    vocab = model.config.vocab_size

    def peak(length: int) -> int:
        ids = torch.randint(0, vocab, (4, length))
        attn = torch.ones_like(ids, dtype=torch.bool)
        tracemalloc.start()
        logp, _ = token_logprobs(model, ids, attn, attn, chunk_tokens=64, with_entropy=True)
        logp.sum().backward()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    torch.set_num_threads(1)
    small, large = peak(128), peak(512)
    full_logits_bytes = 4 * 512 * vocab * 4
    assert large - small < full_logits_bytes / 2, (small, large, full_logits_bytes)


@pytest.mark.smollm2
@pytest.mark.slow
def test_a_step_on_smollm2_raises_logprob_of_positive_completions(smollm2_dir):
    from rl.models import load_tokenizer
    from rl.runtime import build_env

    job = load_job("quickstart", ["trainer.lr=1e-4"])
    from trainers.adapters import apply_adapter

    model = apply_adapter(load_causal_lm(smollm2_dir), job.adapter)
    engine = build_engine(job.rollout, smollm2_dir, "float32", "cpu", 0, model=model)
    prompts = list(build_env(job, load_tokenizer(smollm2_dir)).train_prompts())[:2]
    batch = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=16, seed=0))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    batch = batch.with_rewards(rewards).with_advantages(grpo(rewards, batch.group_ids, job.algorithm.advantage))

    def seq_logp():
        with torch.no_grad():
            lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        return lp.sum(1)

    before = seq_logp()
    trainer = PolicyTrainer(model, job.algorithm, job.trainer, 1.0, "hf", "cpu", 16)
    trainer.step(batch)
    delta = seq_logp() - before
    assert delta[rewards > 0].mean() > 0 > delta[rewards == 0].mean()
