"""Tools for multi-turn episodes (envs/tools.py, envs/tool_calls.py, rl/tool_format.py): the call format, tool
answers as chat turns, and containment: a user tool that hangs, raises or returns garbage gives the model an error
and the episode goes on (real worker processes, a real hang)."""

from __future__ import annotations

import time

import pytest

from envs.tool_calls import ToolEpisode, with_tools_prompt
from envs.tools import Calculator, ToolBox, UserTool
from rl.config.agent import AgentConfig, ToolConfig
from rl.models import load_tokenizer
from rl.tool_format import CALL_CLOSE, observation_frame, parse_call

TOOLS_PY = '''
import time

def lookup(city: str, year: int = 2024) -> str:
    """Population of a city.

    More text the model does not need."""
    return f"{city}: {1000 + year}"

def hang(x: str) -> str:
    """Never answers."""
    time.sleep(600)
    return x

def boom(x: str) -> str:
    """Always fails."""
    raise RuntimeError("database is down")

def garbage(x: str) -> str:
    """Returns a number, not text."""
    return 12345

def flood(x: str) -> str:
    """Returns far too much."""
    return "spam " * 100000
'''


@pytest.fixture
def user_tools(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_PY)
    box = ToolBox({name: UserTool(f"{path}:{name}", name, timeout_s=1.5)
                   for name in ("lookup", "hang", "boom", "garbage", "flood")})
    yield box
    box.close()


def test_tool_calls_are_parsed_or_explained():
    assert parse_call('I will compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}'
                      + CALL_CLOSE) == ("calculator", {"expression": "2*3"})
    assert parse_call('<tool_call>[{"name": "calculator", "arguments": {}}]</tool_call>') == ("calculator", {})
    assert parse_call("The answer is 6.") is None
    assert "not valid JSON" in parse_call("<tool_call>{name: calculator}</tool_call>")
    assert "must end with" in parse_call('<tool_call>{"name": "calculator"')
    assert "JSON object" in parse_call('<tool_call>"calculator"</tool_call>')


def test_calculator_is_exact_and_refuses_code():
    calc = Calculator()
    assert calc({"expression": "123 * 45"}) == "5535"
    assert calc({"expression": "987654321 * 123456789"}) == str(987654321 * 123456789)
    box = ToolBox({"calculator": calc})
    assert box.call("calculator", {"expression": "__import__('os').system('id')"}).startswith("error:")
    assert box.call("calculator", {"expr": "1+1"}).startswith("error:")  # wrong argument name
    assert box.call("nope", {}).startswith("error: no tool named 'nope'")
    assert box.stats["errors/calculator"] == 2 and box.stats["errors/unknown_tool"] == 1


def test_user_tools_are_described_by_their_signature(user_tools):
    spec = user_tools.tools["lookup"].spec
    assert spec.description == "Population of a city."
    assert spec.parameters["properties"] == {"city": {"type": "string", "description": ""},
                                             "year": {"type": "integer", "description": ""}}
    assert spec.parameters["required"] == ["city"]
    assert user_tools.call("lookup", {"city": "Oslo"}) == "Oslo: 3024"


def test_a_failing_tool_is_contained_and_counted(user_tools):
    start = time.monotonic()
    hung = user_tools.call("hang", {"x": "a"})
    assert hung.startswith("error: TimeoutError") and time.monotonic() - start < 30
    assert user_tools.call("lookup", {"city": "Rome"}) == "Rome: 3024"  # the other tools go on
    assert user_tools.call("boom", {"x": "a"}) == "error: RuntimeError: database is down"
    assert user_tools.call("garbage", {"x": "a"}).startswith("error: TypeError")
    assert len(user_tools.call("flood", {"x": "a"})) <= 4000
    assert user_tools.call("lookup", {"town": "Rome"}).startswith("error: TypeError")  # bad arguments
    stats = user_tools.stats
    assert stats["errors/hang"] == stats["errors/boom"] == stats["errors/garbage"] == 1
    assert stats["calls"] == 6


def test_tool_answers_are_chat_turns_and_bounded(tiny_model_dir, user_tools):
    tokenizer = load_tokenizer(tiny_model_dir)
    frame = observation_frame(tokenizer)
    assert frame == ("<|im_end|>\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")  # ChatML
    episode = ToolEpisode(tokenizer, user_tools, frame, max_observation_tokens=40)
    call = tokenizer('<tool_call>{"name": "lookup", "arguments": {"city": "Oslo"}}</tool_call>',
                     add_special_tokens=False)["input_ids"]
    result = episode.step(call)
    assert not result.done
    assert tokenizer.decode(list(result.observation_ids)) == frame[0] + "Oslo: 3024" + frame[1]
    flooded = episode.step(tokenizer('<tool_call>{"name": "flood", "arguments": {"x": "a"}}</tool_call>',
                                     add_special_tokens=False)["input_ids"])
    assert len(flooded.observation_ids) <= 40
    assert tokenizer.decode(list(flooded.observation_ids)).endswith(frame[1])  # the model still gets its turn
    done = episode.step(tokenizer("The population is 3024.", add_special_tokens=False)["input_ids"])
    assert done.done and done.info == {"calls": 2, "errors": 0}


def test_the_prompt_tells_the_model_its_tools():
    box = ToolBox({"calculator": Calculator()})
    text = with_tools_prompt("Answer briefly.", None, box.specs)
    assert "<tool_call>" in text and '"name": "calculator"' in text and text.endswith("Answer briefly.")
    assert with_tools_prompt(None, "Use the calculator.", box.specs) == "Use the calculator."


def test_agent_config_checks_tools(tmp_path):
    with pytest.raises(ValueError, match="unknown tool"):
        ToolConfig(name="web_search")
    with pytest.raises(ValueError, match="share a name"):
        AgentConfig(tools=[{"name": "calculator"}, {"name": "calculator"}])
    assert AgentConfig(tools=[{"name": "python", "kwargs": {"sandbox": "python_only"}}]).tools[0].label == "python"
