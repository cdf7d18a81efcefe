"""`verifiers` environments (the real library, tests/unit/rollout/verifiers_envs.py) through the chat endpoint over
the real hf engine (rollout/verifiers_rollout.py): the prompts are the env's dataset, each episode is the env's own
rollout, the learner trains on exactly the served tokens (log-probs equal to the learner's), and the env's rubric
score reaches the rewards."""

from __future__ import annotations

import pytest
from common import learner_logprobs
from served import Recording, Steered

from rl.config.agent import VerifiersConfig
from rl.models import load_causal_lm, load_tokenizer
from rl.registries import REWARDS
from rl.types import SamplingParams
from rollout.engine import build_engine
from rollout.verifiers_rollout import VerifiersPrompts, VerifiersRollout


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def engine(tiny_model_dir):
    from rl.config import load_job

    return Recording(build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0))


def _run(engine, tokenizer, kind: str, prompts: int = 2, group: int = 2, **cfg):
    config = VerifiersConfig(env="verifiers_envs", kwargs={"kind": kind}, **cfg)
    chosen = VerifiersPrompts(config, tokenizer).train_prompts()[:prompts]
    rollout = VerifiersRollout(engine, tokenizer, config, max_turns=8)
    try:
        return chosen, rollout.generate(chosen, SamplingParams(group_size=group, max_new_tokens=6, seed=5))
    finally:
        rollout.close()


def _served_exactly(engine, batch, prompts, model, bound: float = 1e-4) -> None:
    for i in range(batch.num_samples):
        g, j = divmod(i, 2)
        served = [engine.sampled[f"{prompts[g].prompt_id}#{j}#{t}"] for t in range(batch.sample_meta[i]["turns"])]
        p = int(batch.prompt_lengths[i])
        trained = [t for t, m in zip(batch.input_ids[i, p:].tolist(), batch.loss_mask[i, p:].tolist()) if m]
        assert trained == [t for turn in served for t in turn]  # exactly the engine's tokens, nothing re-tokenised
    diff = (learner_logprobs(model, batch, 1.0) - batch.sampling_logprobs).abs()[batch.loss_mask]
    print(f"max |learner - sampler| logprob over {int(batch.loss_mask.sum())} served tokens: {float(diff.max()):.2e}")
    assert int(batch.loss_mask.sum()) > 0 and float(diff.max()) < bound
    assert (batch.sampling_logprobs[~batch.loss_mask] == 0).all()


def test_the_prompts_are_the_verifiers_envs_dataset(tokenizer):
    prompts = VerifiersPrompts(VerifiersConfig(env="verifiers_envs", kwargs={"size": 5}), tokenizer)
    train = prompts.train_prompts()
    assert [p.meta["answer"] for p in train] == ["0", "1", "2", "3", "4"]
    assert "Repeat the number 3." in train[3].text and train[3].meta["vf_input"]["example_id"] == 3
    assert len({p.prompt_id for p in train}) == 5
    assert [p.meta["answer"] for p in prompts.test_prompts()] == ["0", "1", "2", "3", "4"]  # verifiers' fallback


def test_a_single_turn_env_trains_on_the_served_tokens_and_its_rubric_is_the_reward(engine, tokenizer,
                                                                                     tiny_model_dir):
    prompts, batch = _run(engine, tokenizer, "single")
    assert batch.num_samples == 4 and batch.group_ids.tolist() == [0, 0, 1, 1]
    assert [m["turns"] for m in batch.sample_meta] == [1, 1, 1, 1]
    _served_exactly(engine, batch, prompts, load_causal_lm(tiny_model_dir, "float32", "cpu"))
    reward = REWARDS.get("verifiers")
    for i, meta in enumerate(batch.sample_meta):
        text = batch.completion_texts[i]
        metrics = meta["vf_metrics"]
        assert metrics["brevity"] == pytest.approx(1.0 / (1.0 + len(text.strip())), rel=0.3)
        assert meta["vf_reward"] == pytest.approx(metrics["exact"] + 0.5 * metrics["brevity"])
        assert reward("", text, **meta) == meta["vf_reward"]
        assert reward("", text, metric="brevity", **meta) == metrics["brevity"]
    assert len({m["vf_reward"] for m in batch.sample_meta}) > 1  # the episodes differ: GRPO has a signal


def test_a_multi_turn_env_runs_its_turns_through_the_endpoint(engine, tokenizer, tiny_model_dir):
    prompts, batch = _run(engine, tokenizer, "multi")
    assert [m["turns"] for m in batch.sample_meta] == [3, 3, 3, 3]  # the env's max_turns=3
    for i in range(4):
        p = int(batch.prompt_lengths[i])
        row, mask = batch.input_ids[i, p:].tolist(), batch.loss_mask[i, p:].tolist()
        context = tokenizer.decode([t for t, m in zip(row, mask) if not m])
        assert "go on 0" in context and "go on 1" in context  # the env's messages: context, never trained
        assert batch.sample_meta[i]["vf_metrics"]["num_turns"] == 3
    _served_exactly(engine, batch, prompts, load_causal_lm(tiny_model_dir, "float32", "cpu"))


def test_an_unknown_env_or_a_clashing_agent_key_is_refused_at_validation(tmp_path):
    import pydantic

    from rl.config.agent import AgentConfig

    with pytest.raises(ValueError, match="no module 'no_such_vf_env' is installed"):
        VerifiersConfig(env="no-such-vf-env")
    with pytest.raises(ValueError, match="verifiers environment file not found"):
        VerifiersConfig(env=str(tmp_path / "missing.py"))
    agent = tmp_path / "agent.py"
    agent.write_text("def run(client, question, fields):\n    pass\n")
    with pytest.raises(pydantic.ValidationError, match=r"openai_agent and agent\.verifiers are both set"):
        AgentConfig(verifiers={"env": "verifiers_envs"}, openai_agent={"import_path": f"{agent}:run"})
    with pytest.raises(pydantic.ValidationError, match="brings its own tools"):
        AgentConfig(verifiers={"env": "verifiers_envs"}, tools=[{"name": "calculator"}])


def test_a_tool_env_calls_its_tool_through_the_endpoints_tools(tokenizer, tiny_model_dir):
    """vf.ToolEnv sends its tools as OpenAI `tools`: the prompt describes them, the served call comes back as
    `tool_calls`, the env runs `add` and answers with a `tool` message (context), the model goes on; the learner
    trains on exactly the served tokens."""
    from rl.config import load_job

    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    model = load_causal_lm(tiny_model_dir, "float32", "cpu")
    job = load_job("tiny", ["rollout.max_prompt_tokens=960"])  # the tools' description makes prompts longer
    engine = Steered(build_engine(job.rollout, tiny_model_dir, "float32", "cpu", seed=0), model, tokenizer, call)
    prompts, batch = _run(engine, tokenizer, "tool")
    for i in range(batch.num_samples):
        g, j = divmod(i, 2)
        pid = f"{prompts[g].prompt_id}#{j}"
        first = tokenizer.decode(engine.contexts[f"{pid}#0"])
        assert '"name": "add"' in first and "Add two integers." in first  # the env's tool, described
        second = tokenizer.decode(engine.contexts[f"{pid}#1"])
        assert second.startswith(first) and call in second and "<|im_start|>tool\n5<|im_end|>" in second
        metrics = batch.sample_meta[i]["vf_metrics"]  # the call, then a real turn without one: the env stops
        assert batch.sample_meta[i]["turns"] == 2 and metrics["add_calls"] == metrics["total_tool_calls"] == 1
    _served_exactly(engine, batch, prompts, model)


def test_an_env_that_hangs_or_raises_is_contained_and_the_run_goes_on(tokenizer, tiny_model_dir):
    """Example 0 hangs (async: cut at timeout_s), 1 raises (its episode ends with what it had), 3 is fine; then
    example 2 blocks the event loop itself (a sync call that hangs): the step still ends, and the next step runs on a
    fresh loop. Every cut episode ends with finish `abort`, scores 0 and is counted."""
    import time

    from rl.config import load_job

    engine = build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)
    config = VerifiersConfig(env="verifiers_envs", kwargs={"kind": "faulty"}, timeout_s=3)
    prompts = VerifiersPrompts(config, tokenizer).train_prompts()
    rollout = VerifiersRollout(engine, tokenizer, config, max_turns=8)
    params = SamplingParams(group_size=2, max_new_tokens=4, seed=1)
    try:
        batch = rollout.generate([prompts[0], prompts[1], prompts[3]], params)
        meta = batch.sample_meta
        assert [m["agent_timeout"] for m in meta] == [1, 1, 0, 0, 0, 0]
        assert [m["agent_error"] for m in meta] == [0, 0, 1, 1, 0, 0]
        assert list(batch.finish_reasons[:4]) == ["abort"] * 4 and [m["turns"] for m in meta] == [1, 1, 1, 1, 3, 3]
        assert [m["vf_reward"] for m in meta[:4]] == [0.0] * 4 and all(m["vf_reward"] > 0 for m in meta[4:])
        start = time.monotonic()
        stuck = rollout.generate([prompts[2]], params)
        assert time.monotonic() - start < 3 * 2 + 5  # timeout_s x (1 wave + scoring), not the 30-s block
        assert list(stuck.finish_reasons) == ["abort", "abort"] and all(m["agent_timeout"] for m in stuck.sample_meta)
        after = rollout.generate([prompts[4]], params)  # a fresh event loop
        assert [m["turns"] for m in after.sample_meta] == [3, 3]
        assert not any(m["agent_timeout"] for m in after.sample_meta)
    finally:
        rollout.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_a_multi_turn_env_over_vllm_follows_pushed_weights_and_matches_the_learner(tokenizer, tiny_model_dir):
    """Over the vLLM engine after a weight push: the env's 3-turn episodes are sampled by the pushed weights (the
    learner's log-probs under them equal the sampler's on exactly the served tokens)."""
    import torch

    from rl.config import load_job

    vllm = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0)
    try:
        torch.manual_seed(1)  # perturbed weights: the learner's next policy
        model = load_causal_lm(tiny_model_dir, "float32", "cpu")
        weights = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        vllm.push_weights(weights.items(), 1)
        model.load_state_dict(weights)
        engine = Recording(vllm)
        prompts, batch = _run(engine, tokenizer, "multi")
        assert batch.policy_version == 1 and [m["turns"] for m in batch.sample_meta] == [3, 3, 3, 3]
        _served_exactly(engine, batch, prompts, model, bound=1e-3)  # the pushed weights, as the learner has them
    finally:
        vllm.close()
