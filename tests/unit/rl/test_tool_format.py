"""The tool-call format (rl/tool_format.py): a chat template with its own tool syntax (Qwen2.5's, the real template
text in tests/unit/rl/data) renders the tools itself, its calls parse and a tool's answer is its tool turn; a template
without one (the tiny model's ChatML, as SmolLM2's) falls back to rlpost's documented tag format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from envs.base import render_prompt
from envs.tool_calls import ToolEpisode, schemas, with_tools_prompt
from envs.tools import Calculator, ToolBox
from rl.config.agent import AgentConfig
from rl.models import load_tokenizer
from rl.tool_format import CALL_FORMATS, continuation, detect, observation_frame, parse_llama_json, parse_tagged

QWEN25 = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text()
CALCULATOR_SCHEMA = {"type": "function", "function": {"name": "calculator", "description": Calculator.spec.description,
                                                      "parameters": Calculator.spec.parameters}}


@pytest.fixture
def qwen(tiny_model_dir):
    """The tiny model's tokenizer with Qwen2.5-Instruct's chat template (which renders `tools=` itself)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = QWEN25
    return tokenizer


@pytest.fixture
def calculator():
    box = ToolBox({"calculator": Calculator()})
    yield box
    box.close()


def test_a_template_with_tool_syntax_renders_its_own_tool_block(qwen, calculator):
    assert detect(qwen).name == "hermes"
    system = with_tools_prompt("Answer briefly.", None, calculator.specs, qwen, "auto")
    prompt = render_prompt(qwen, "What is 123 * 45?", system, "p0", {})
    expected = qwen.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": "What is 123 * 45?"}],
                                        tools=schemas(calculator.specs), tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected  # the env's prompt is the template's own rendering with tools=
    assert "# Tools\n\nYou may call one or more functions" in prompt.text and '"name": "calculator"' in prompt.text
    assert "You can call tools. To call one" not in prompt.text  # not rlpost's generated text


def test_a_call_in_the_templates_format_parses_and_its_answer_is_the_templates_tool_turn(qwen, calculator):
    fmt = detect(qwen)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123 * 45"}}\n</tool_call>'
    assert fmt.parse("Let me compute.\n" + call) == [("calculator", {"expression": "123 * 45"})]
    assert fmt.strip_calls("Let me compute.\n" + call) == "Let me compute."
    frame = observation_frame(qwen, fmt)
    assert frame == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"
                                                                          "<|im_start|>assistant\n")
    episode = ToolEpisode(qwen, calculator, frame, max_observation_tokens=64, call_format=fmt)
    result = episode.step(qwen(call, add_special_tokens=False)["input_ids"])
    assert qwen.decode(list(result.observation_ids)) == frame[0] + "5535" + frame[1]
    closed = episode.step(qwen(call, add_special_tokens=False)["input_ids"] + [qwen.eos_token_id])
    assert qwen.decode(list(closed.observation_ids)) == frame[0].removeprefix("<|im_end|>") + "5535" + frame[1]


def test_a_template_without_tool_syntax_falls_back_to_tags(tiny_model_dir, calculator):
    tokenizer = load_tokenizer(tiny_model_dir)  # ChatML without tools, as SmolLM2's
    assert detect(tokenizer).name == "tags"
    system = with_tools_prompt("Answer briefly.", None, calculator.specs, tokenizer, "auto")
    assert system.startswith("You can call tools. To call one, write exactly\n<tool_call>")
    assert observation_frame(tokenizer) == ("<|im_end|>\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")


def test_the_job_key_forces_a_format(qwen, calculator):
    assert AgentConfig(tools=[{"name": "calculator"}]).tool_format == "auto"
    assert detect(qwen, AgentConfig(tool_format="tags").tool_format).name == "tags"
    system = with_tools_prompt(None, None, calculator.specs, qwen, "tags")
    assert system.startswith("You can call tools.")
    with pytest.raises(ValueError, match="unknown tool-call format 'qwen'"):
        AgentConfig(tool_format="qwen")
    assert {"auto", *CALL_FORMATS.names()} >= {"auto", "hermes", "llama3_json", "tags"}


def test_a_history_renders_after_a_held_turn_as_the_template_frames_it(qwen):
    """The sentinel framing: only what follows a turn held as tokens is rendered (one implementation)."""
    after = continuation(qwen, [{"role": "user", "content": "q"}],
                         [{"role": "tool", "content": "5535"}, {"role": "tool", "content": "7"}], detect(qwen))
    assert after == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n5535\n</tool_response>\n<tool_response>\n7\n"
                     "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_llama_style_json_calls_parse():
    assert parse_llama_json('{"name": "calculator", "parameters": {"expression": "2*3"}}') == [
        ("calculator", {"expression": "2*3"})]
    assert parse_llama_json("The answer is 6.") is None
    assert "not valid JSON" in parse_llama_json('{"name": calculator}')
    assert parse_tagged('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"}</tool_call>') \
        == [("a", {}), ("b", {})]
    assert json.loads(CALL_FORMATS.get("llama3_json").write("f", {"x": 1})) == {"name": "f", "parameters": {"x": 1}}


@pytest.mark.parametrize("tool_format", ["auto", "tags"])
def test_a_job_on_a_model_with_a_tool_template_uses_its_syntax_in_prompts_and_episodes(tiny_model_dir, tmp_path,
                                                                                       tool_format):
    """The run's wiring: the env's prompts (rl/loop/runtime.build_env) and the worker's tool episodes
    (rl/loop/worker._episodes) on a model whose own chat template is Qwen2.5's."""
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.loop.worker import _episodes

    model_dir = tmp_path / "qwen-templated"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(QWEN25)
    job = load_job("tiny")
    job = job.model_copy(update={"agent": AgentConfig(tools=[{"name": "calculator"}], tool_format=tool_format)})
    tokenizer = load_tokenizer(str(model_dir))
    prompt = next(iter(build_env(job, tokenizer).test_prompts()))
    system = [{"role": "system", "content": job.env.system_prompt}] if job.env.system_prompt else []
    native = tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt.meta["question"]}],
                                           tools=[CALCULATOR_SCHEMA], tokenize=False, add_generation_prompt=True)
    assert (prompt.text == native) == (tool_format == "auto")
    assert ("# Tools\n\nYou may call" in prompt.text) == (tool_format == "auto")
    episodes = _episodes(job, str(model_dir), engine=None)
    try:
        env = episodes.new_env()
        assert env.call_format.name == {"auto": "hermes", "tags": "tags"}[tool_format]
        assert episodes.stop == ("</tool_call>",)
        assert env.frame[0] == "<|im_end|>\n<|im_start|>user\n<tool_response>\n"  # Qwen's tool turn either way
    finally:
        episodes.close()


def test_a_llama_style_template_is_detected_and_described_where_it_puts_no_tools_in_the_system_turn(
        tiny_model_dir, calculator):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = (Path(__file__).parent / "data" / "llama3_1_style_chat_template.jinja").read_text()
    fmt = detect(tokenizer)
    assert fmt.name == "llama3_json" and fmt.stop == ()
    # its tools go in the first user turn, which an env's system prompt cannot carry: the format's own words
    system = with_tools_prompt("Answer briefly.", None, calculator.specs, tokenizer, "auto")
    assert system.startswith("Given the following functions") and system.endswith("\n\nAnswer briefly.")
    assert fmt.parse('{"name": "calculator", "parameters": {"expression": "2 * 3"}}') == [
        ("calculator", {"expression": "2 * 3"})]
    before, after = observation_frame(tokenizer, fmt)
    assert (before, after) == ("<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n",
                               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
