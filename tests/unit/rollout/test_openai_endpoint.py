"""The OpenAI-compatible endpoint (rollout/openai_server.py, rollout/endpoint_rollout.py) over the real hf engine,
driven by the real `openai` client: an agent's 3-turn conversation is recorded exactly as sampled (tokens, mask,
log-probs equal to the learner's), concurrent agents share engine calls, an agent that raises or hangs is
contained, and the bearer token is enforced."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from common import learner_logprobs, prompts_for
from served import Recording, Steered

from rl.config import load_job
from rl.models import load_causal_lm, load_tokenizer
from rl.netauth import Access
from rl.types import SamplingParams
from rollout.chat_session import SessionSpec
from rollout.endpoint_rollout import EndpointRollout, openai_client
from rollout.engine import build_engine
from rollout.openai_server import ChatServer

TOKEN = "a-test-token-of-enough-characters"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def engine(tiny_model_dir):
    return Recording(build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0))


def _chat(client: openai.OpenAI, messages: list[dict], **kw) -> str:
    reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=6, **kw)
    return reply.choices[0].message.content or ""


def turns_agent(turns: int, replies: dict | None = None):
    """An agent of `turns` completions, each followed by a user message; records the replies it got."""

    def run(client: openai.OpenAI, question: str, fields: dict) -> None:
        messages = [{"role": "user", "content": question}]
        for t in range(turns):
            content = _chat(client, messages)
            if replies is not None:
                replies.setdefault(question, []).append(content)
            messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"go on {t}"}]

    return run


def test_a_three_turn_openai_conversation_trains_on_exactly_the_served_tokens(engine, tokenizer, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=2)
    replies: dict = {}
    rollout = EndpointRollout(engine, tokenizer, turns_agent(3, replies), concurrency=4)
    try:
        batch = rollout.generate(prompts, SamplingParams(group_size=2, max_new_tokens=6, seed=3))
    finally:
        rollout.close()
    assert batch.num_samples == 4 and batch.group_ids.tolist() == [0, 0, 1, 1]
    for i in range(4):
        g, j = divmod(i, 2)
        served = [engine.sampled[f"{prompts[g].prompt_id}#{j}#{t}"] for t in range(3)]
        p = int(batch.prompt_lengths[i])
        first = tokenizer.apply_chat_template([{"role": "user", "content": prompts[g].meta["question"]}],
                                              tokenize=False, add_generation_prompt=True)
        assert batch.input_ids[i, :p].tolist() == tokenizer(first, add_special_tokens=False)["input_ids"]
        row, mask = batch.input_ids[i, p:].tolist(), batch.loss_mask[i, p:].tolist()
        trained = [t for t, m in zip(row, mask) if m]
        assert trained == served[0] + served[1] + served[2]  # exactly the engine's tokens, nothing re-tokenised
        assert row[: len(served[0])] == served[0] and all(mask[: len(served[0])])
        gap = tokenizer.decode(row[len(served[0]): mask.index(True, len(served[0]))])
        assert "go on 0" in gap and "assistant" in gap  # the new user turn is context, not trained
        assert batch.sample_meta[i]["turns"] == 3 and batch.finish_reasons[i] in ("stop", "length")
    assert sorted(len(r) for r in replies.values()) == [6, 6]  # 2 episodes x 3 turns per question
    model = load_causal_lm(tiny_model_dir, "float32", "cpu")
    diff = (learner_logprobs(model, batch, 1.0) - batch.sampling_logprobs).abs()[batch.loss_mask]
    print(f"max |learner - sampler| logprob over {int(batch.loss_mask.sum())} served tokens: {float(diff.max()):.2e}")
    assert float(diff.max()) < 1e-4
    assert (batch.sampling_logprobs[~batch.loss_mask] == 0).all()


def test_concurrent_agents_share_engine_calls(engine, tokenizer, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=4)
    rollout = EndpointRollout(engine, tokenizer, turns_agent(2), concurrency=8, window_s=0.05)
    try:
        batch = rollout.generate(prompts, SamplingParams(group_size=2, max_new_tokens=6))
    finally:
        rollout.close()
    requests = rollout.server.batcher.requests
    print(f"{requests} requests served in {engine.calls} engine calls")
    assert requests == 16 and batch.num_samples == 8
    assert engine.calls < requests / 2


def test_an_agent_that_raises_or_hangs_is_contained(engine, tokenizer, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=3)
    bad = {prompts[0].meta["question"]: "raise", prompts[1].meta["question"]: "hang"}
    late: list[BaseException] = []

    def run(client: openai.OpenAI, question: str, fields: dict) -> None:
        messages = [{"role": "user", "content": question}]
        content = _chat(client, messages)
        if bad.get(question) == "raise":
            raise RuntimeError("the agent broke")
        if bad.get(question) == "hang":
            time.sleep(3)  # past timeout_s: the episode ends without it; its late request is refused
            try:
                _chat(client, [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": "x"}])
            except openai.BadRequestError as exc:
                late.append(exc)
            return
        _chat(client, [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": "more"}])

    rollout = EndpointRollout(engine, tokenizer, run, concurrency=3, timeout_s=1.5)
    try:
        start = time.monotonic()
        batch = rollout.generate(prompts, SamplingParams(group_size=1, max_new_tokens=6))
        assert time.monotonic() - start < 3
        assert batch.finish_reasons[0] == "abort" and batch.sample_meta[0]["agent_error"] == 1.0
        assert batch.finish_reasons[1] == "abort" and batch.sample_meta[1]["agent_timeout"] == 1.0
        assert [m["turns"] for m in batch.sample_meta] == [1, 1, 2]  # each kept what it was served
        assert batch.finish_reasons[2] in ("stop", "length") and batch.sample_meta[2]["agent_error"] == 0.0
        assert all(int(batch.loss_mask[i].sum()) > 0 for i in range(3))
        time.sleep(2.5)
        assert late and "closed" in str(late[0])
    finally:
        rollout.close()


@pytest.fixture
def guarded(engine, tokenizer, tiny_model_dir):
    server = ChatServer(engine, tokenizer, access=Access(TOKEN, rate_per_s=None))
    prompt = prompts_for(tiny_model_dir, count=1)[0]
    server.open_session("s1", SessionSpec(prompt, 0, 0, SamplingParams(max_new_tokens=4)))
    yield server, prompt
    server.close()


def test_no_token_or_a_wrong_token_is_401(guarded):
    server, prompt = guarded
    messages = [{"role": "user", "content": prompt.meta["question"]}]
    with pytest.raises(openai.AuthenticationError):
        _chat(openai_client(server.url, "a-wrong-token-of-enough-chars", "s1", 30), messages)
    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(server.url + "/models", timeout=10)
    assert no_token.value.code == 401
    assert _chat(openai_client(server.url, TOKEN, "s1", 30), messages) is not None
    assert openai_client(server.url, TOKEN, "s1", 30).models.list().data[0].id == "rlpost"


def test_an_edited_history_or_another_temperature_is_refused(guarded):
    server, prompt = guarded
    client = openai_client(server.url, TOKEN, "s1", 30)
    messages = [{"role": "user", "content": prompt.meta["question"]}]
    content = _chat(client, messages)
    with pytest.raises(openai.BadRequestError, match="do not extend"):
        _chat(client, [*messages, {"role": "assistant", "content": content + " edited"},
                       {"role": "user", "content": "next"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(client, [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": "next"}],
              temperature=0.3)
    with pytest.raises(openai.BadRequestError, match="tool_choice='required' is not supported"):
        _chat(client, messages, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
              tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="tools differ"):  # the prompt described no tools
        _chat(client, [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": "next"}],
              tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="stream"):
        _chat(client, messages, stream=True)
    with pytest.raises(openai.BadRequestError, match="unknown or closed session"):
        _chat(openai_client(server.url, TOKEN, "nobody", 30), messages)
    assert server.sessions["s1"].turns == 1


def test_a_turn_the_model_closed_itself_is_not_closed_twice(tokenizer, tiny_model_dir):
    """The template closes an assistant turn with EOS (`<|im_end|>`); a reply that sampled it gets only the rest."""
    from rollout.chat_session import Message, Session

    prompt = prompts_for(tiny_model_dir, count=1)[0]
    first = [Message("user", "hi")]
    for ended_by_eos in (True, False):
        session = Session(SessionSpec(prompt, 0, 0, SamplingParams()))
        context = session.context(tokenizer, first)
        sampled = tokenizer("yo", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended_by_eos
        session.record(first, context, (sampled, [0.0] * len(sampled), "stop"), Message("assistant", "yo"))
        nxt = session.context(tokenizer, [*first, Message("assistant", "yo"), Message("user", "again")])
        assert tokenizer.decode(nxt) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                                         "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")


def test_the_openai_agent_key_checks_the_agent_before_any_model_loads(tmp_path):
    import pydantic

    from rl.config.agent import AgentConfig

    (tmp_path / "agent.py").write_text("def run(client):\n    pass\n\ndef good(client, question, fields):\n    pass\n")
    with pytest.raises(pydantic.ValidationError, match=r"must accept \(client, question, fields\)"):
        AgentConfig.model_validate({"openai_agent": {"import_path": f"{tmp_path}/agent.py:run"}})
    with pytest.raises(pydantic.ValidationError, match="calls its own tools"):
        AgentConfig.model_validate({"openai_agent": {"import_path": f"{tmp_path}/agent.py:good"},
                                    "tools": [{"name": "calculator"}]})
    cfg = AgentConfig.model_validate({"openai_agent": {"import_path": f"{tmp_path}/agent.py:good"}})
    assert cfg.openai_agent is not None and cfg.openai_agent.concurrency == 16


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_conversations_follow_pushed_weights_and_match_the_learner(tokenizer, tiny_model_dir):
    """Over the vLLM engine: a 3-turn conversation after a weight push is sampled by the pushed weights (the
    learner's log-probs under them equal the sampler's), and a greedy conversation is the hf engine's."""
    import torch

    vllm = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0)
    hf = build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)
    try:
        torch.manual_seed(1)  # perturbed weights: the learner's next policy, and varied greedy text
        weights = {k: v + 0.3 * torch.randn_like(v) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
        vllm.push_weights(weights.items(), 1)
        hf.push_weights(weights.items(), 1)
        prompts = prompts_for(tiny_model_dir, count=3)
        rollout = EndpointRollout(Recording(vllm), tokenizer, turns_agent(3))
        try:
            sampled = rollout.generate(prompts, SamplingParams(group_size=2, max_new_tokens=5, seed=4))
            greedy = rollout.generate(prompts, SamplingParams(group_size=1, max_new_tokens=6, greedy=True))
        finally:
            rollout.close()
        assert sampled.policy_version == 1 and {m["turns"] for m in sampled.sample_meta} == {3}
        diff = (learner_logprobs(hf.model, sampled, 1.0) - sampled.sampling_logprobs).abs()[sampled.loss_mask]
        print(f"vLLM via the endpoint, 3 turns: max |learner - sampler| logprob = {float(diff.max()):.2e}")
        assert float(diff.max()) < 1e-3
        on_hf = EndpointRollout(hf, tokenizer, turns_agent(3))
        try:
            same = on_hf.generate(prompts, SamplingParams(group_size=1, max_new_tokens=6, greedy=True))
        finally:
            on_hf.close()
        assert len(set(greedy.completion_texts)) > 1 and torch.equal(greedy.input_ids, same.input_ids)
        assert torch.equal(greedy.loss_mask, same.loss_mask)
    finally:
        vllm.close()


def test_episodes_are_reproducible_whatever_shares_their_engine_calls(engine, tokenizer, tiny_model_dir):
    """Turn t of episode j of a prompt is seeded from (seed, prompt, j, t): one agent at a time or eight at once
    (other engine calls, other batch mates) sample the same episodes; another seed samples others."""
    prompts = prompts_for(tiny_model_dir, count=4)
    params = SamplingParams(group_size=2, max_new_tokens=6, seed=11)
    batches = []
    for concurrency, seed in ((1, 11), (8, 11), (8, 12)):
        rollout = EndpointRollout(engine, tokenizer, turns_agent(2), concurrency=concurrency)
        try:
            batches.append(rollout.generate(prompts, dataclasses.replace(params, seed=seed)))
        finally:
            rollout.close()
    one, eight, other = batches
    assert one.input_ids.tolist() == eight.input_ids.tolist() and one.loss_mask.tolist() == eight.loss_mask.tolist()
    assert one.input_ids.tolist() != other.input_ids.tolist()


def test_one_agents_overlong_context_fails_only_its_own_turn(engine, tokenizer, tiny_model_dir):
    """Requests batched into one engine call: the engine refusing one (a prompt over rollout.max_prompt_tokens)
    fails that request with the engine's message, and the others in the same call are served."""
    prompts = prompts_for(tiny_model_dir, count=4)
    long_one, errors = prompts[0].meta["question"], []

    def run(client: openai.OpenAI, question: str, fields: dict) -> None:
        messages = [{"role": "user", "content": question + (" 7" * 2000 if question == long_one else "")}]
        try:
            content = _chat(client, messages)
        except openai.BadRequestError as exc:
            errors.append(str(exc))
            raise
        _chat(client, [*messages, {"role": "assistant", "content": content}, {"role": "user", "content": "more"}])

    rollout = EndpointRollout(engine, tokenizer, run, concurrency=4, window_s=0.3)
    try:
        batch = rollout.generate(prompts, SamplingParams(group_size=1, max_new_tokens=6))
    finally:
        rollout.close()
    assert len(errors) == 1 and "max_prompt_tokens" in errors[0]
    assert batch.finish_reasons[0] == "abort" and batch.sample_meta[0]["turns"] == 0
    assert [m["turns"] for m in batch.sample_meta[1:]] == [2, 2, 2]
    assert int(batch.loss_mask[0].sum()) == 0  # nothing served, nothing trained


def test_a_turn_past_max_turns_is_refused_and_the_episode_ends_with_length(engine, tokenizer, tiny_model_dir):
    rollout = EndpointRollout(engine, tokenizer, turns_agent(3), max_turns=2)
    try:
        batch = rollout.generate(prompts_for(tiny_model_dir, count=1), SamplingParams(max_new_tokens=4))
    finally:
        rollout.close()
    assert batch.sample_meta[0]["turns"] == 2 and batch.sample_meta[0]["truncation"] == "max_turns"
    assert batch.finish_reasons[0] == "length" and batch.sample_meta[0]["agent_error"] == 1.0


CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
QWEN25 = (Path(__file__).parents[1] / "rl" / "data" / "qwen2_5_chat_template.jinja").read_text()


def tool_agent(log: list):
    """A tool-using agent written against the OpenAI client: it passes `tools`, runs the calls it gets back,
    answers each with a `tool` message, then asks a follow-up question (3 completions)."""

    def run(client: openai.OpenAI, question: str, fields: dict) -> None:
        messages: list = [{"role": "user", "content": question}]
        for turn in range(3):
            reply = client.chat.completions.create(model="policy", messages=messages, tools=[CALCULATOR],
                                                   tool_choice="auto", max_tokens=6)
            choice = reply.choices[0]
            log.append(choice)
            messages.append(choice.message)  # the reply as served, as agents pass it back
            for call in choice.message.tool_calls or []:
                expression = json.loads(call.function.arguments)["expression"]
                messages.append({"role": "tool", "tool_call_id": call.id, "content": str(eval(expression))})
            if not choice.message.tool_calls:
                messages.append({"role": "user", "content": f"thanks {turn}"})

    return run


@pytest.mark.parametrize("template", ["chatml", "qwen2.5"])
def test_tools_through_the_endpoint_train_on_exactly_the_served_tokens(template, tiny_model_dir):
    """OpenAI `tools=`: the prompt describes them (the template's own tool block where it has one, else the tag
    format's text), the served call comes back as `tool_calls` (finish_reason "tool_calls"), the `tool` answer is
    accepted and framed as the template's tool turn, and the learner trains on exactly the served tokens."""
    tokenizer = load_tokenizer(tiny_model_dir)
    if template == "qwen2.5":
        tokenizer.chat_template = QWEN25
    call = {"chatml": '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>',
            "qwen2.5": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123 * 45"}}\n</tool_call>'}
    model = load_causal_lm(tiny_model_dir, "float32", "cpu")
    job = load_job("tiny", ["rollout.max_prompt_tokens=960"])  # the tools' description makes prompts longer
    engine = Steered(build_engine(job.rollout, tiny_model_dir, "float32", "cpu", seed=0), model, tokenizer,
                     call[template])
    prompts, log = prompts_for(tiny_model_dir, count=1), []
    rollout = EndpointRollout(engine, tokenizer, tool_agent(log), concurrency=1)
    try:
        batch = rollout.generate(prompts, SamplingParams(group_size=2, max_new_tokens=6, seed=5))
    finally:
        rollout.close()
    first = log[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in first.message.tool_calls] == [
        ("function", "calculator", {"expression": "123 * 45"})]
    assert first.message.tool_calls[0].id.startswith("call_")
    assert len(log) == 6 and all(c.finish_reason in ("stop", "length", "tool_calls") for c in log[1:])
    pid = prompts[0].prompt_id
    prompt_text = tokenizer.decode(engine.contexts[f"{pid}#0#0"])
    tool_block = {"chatml": "You can call tools. To call one, write exactly\n<tool_call>",
                  "qwen2.5": "# Tools\n\nYou may call one or more functions to assist with the user query."}
    assert tool_block[template] in prompt_text and '"name": "calculator"' in prompt_text
    answer_turn = {"chatml": "<|im_start|>tool\n5535<|im_end|>\n<|im_start|>assistant\n",
                   "qwen2.5": "<|im_start|>user\n<tool_response>\n5535\n</tool_response><|im_end|>\n"
                              "<|im_start|>assistant\n"}
    for i in range(2):
        served = [engine.sampled[f"{pid}#{i}#{t}"] for t in range(3)]
        second = engine.contexts[f"{pid}#{i}#1"]
        assert second[:len(engine.contexts[f"{pid}#{i}#0"])] == engine.contexts[f"{pid}#{i}#0"]
        assert tokenizer.decode(second).endswith(call[template] + "<|im_end|>\n" + answer_turn[template])
        p = int(batch.prompt_lengths[i])
        row, mask = batch.input_ids[i, p:].tolist(), batch.loss_mask[i, p:].tolist()
        assert [t for t, m in zip(row, mask) if m] == served[0] + served[1] + served[2]  # nothing re-tokenised
        assert batch.sample_meta[i]["turns"] == 3
    diff = (learner_logprobs(model, batch, 1.0) - batch.sampling_logprobs).abs()[batch.loss_mask]
    print(f"{template}: max |learner - sampler| logprob over {int(batch.loss_mask.sum())} served tokens: "
          f"{float(diff.max()):.2e}")
    assert float(diff.max()) < 1e-4


def test_tool_choice_none_describes_the_tools_but_reads_no_calls(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>'
    engine = Steered(build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0),
                     load_causal_lm(tiny_model_dir, "float32", "cpu"), tokenizer, call)
    server = ChatServer(engine, tokenizer, access=Access(TOKEN, rate_per_s=None))
    prompt = prompts_for(tiny_model_dir, count=1)[0]
    server.open_session("s1", SessionSpec(prompt, 0, 0, SamplingParams(max_new_tokens=4)))
    try:
        client = openai_client(server.url, TOKEN, "s1", 30)
        reply = client.chat.completions.create(model="p", messages=[{"role": "user", "content": "hi"}],
                                               tools=[CALCULATOR], tool_choice="none")
        assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
        assert reply.choices[0].message.content == call
        with pytest.raises(openai.BadRequestError, match="tool_calls must be"):
            client.chat.completions.create(model="p", tools=[CALCULATOR], messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": call, "tool_calls": [{"type": "function", "id": "x",
                                                                       "function": {"name": "f", "arguments": "{"}}]}])
    finally:
        server.close()
