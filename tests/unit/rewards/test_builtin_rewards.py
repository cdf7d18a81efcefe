"""Built-in rewards against hand-labelled cases."""

import threading

import pytest

from rewards.builtin import countdown, digit_fraction, format_reward, last_number, length_penalty, math_answer
from rewards.code_exec import extract_code
from rewards.code_exec import score_code as code_exec_one
from rewards.reasoning import ngram_repetition_ratio, reasoning_pattern

# (completion, gold answer, equivalent?) labelled by hand
MATH_CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}", "1/2", True),
    ("So the result is $0.5$.", "\\frac12", True),
    ("12", "12", True),  # SmolLM2-style bare number
    ("7 + 5 = 12", "12", True),
    ("The answer is 12.", "12", True),
    ("\\boxed{x^2+2x}", "x(x+2)", True),
    ("$\\sqrt{4}$", "2", True),
    ("There are 1,000 apples", "1000", True),
    ("\\boxed{3}", "4", False),
    ("I think 13", "12", False),
    ("\\boxed{\\frac{2}{3}}", "3/2", False),
    ("no idea", "5", False),
    ("$\\boxed{-7}$", "-7", True),
    ("The result is 0.25", "1/4", True),
    ("So x = 1/2", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    # the question restated is no answer, though math-verify evaluates it to the right number
    ("123 * 456", "56088", False),
    ("The answer is 123*456", "56088", False),
    ("$123\\times 456$", "56088", False),
    ("\\boxed{2+3}", "5", False),
    ("123 * 456 = 56088", "56088", True),
    ("226 * 103 is 226 * 103.", "23278", False),  # the full stop made 103 a float: still the question restated
    ("The answer is 23278.", "23278", True),
    ("It is 0.5 * 4.", "2", True),  # a product with a non-whole factor is not the question's shape
]


@pytest.mark.parametrize("completion, answer, equivalent", MATH_CASES)
def test_math_answer_agrees_with_hand_labels(completion, answer, equivalent):
    assert math_answer("q", completion, answer=answer) == float(equivalent)


def test_math_answer_off_the_main_thread_and_without_answer():
    assert math_answer("q", "anything") is None
    out = []
    worker = threading.Thread(target=lambda: out.append(math_answer("q", "\\boxed{1/2}", answer="0.5")))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_last_number_format_and_length():
    assert last_number("q", "first 3, then 1,200", answer="1200") == 1.0
    assert last_number("q", "12 or 13", answer="12") == 0.0
    assert last_number("q", "12", answer="twelve") == 0.0
    assert format_reward("q", "<think>hm</think>\n<answer>4</answer>") == 1.0
    assert format_reward("q", "<answer>4</answer>") == 0.0
    assert format_reward("q", "ANSWER: 4", pattern=r"ANSWER: \d+") == 1.0
    assert digit_fraction("q", "12 ab") == pytest.approx(0.5) and digit_fraction("q", " ") == 0.0
    assert [length_penalty("q", "x" * n, max_chars=10) for n in (5, 10, 15, 20, 40)] == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_countdown_checks_numbers_used_once_and_target():
    nums = [2, 3, 5]
    assert countdown("q", "<answer>(3 + 5) * 2</answer>", numbers=nums, target=16).total == 1.0
    assert countdown("q", "(3 + 5) * 2 = 16", numbers=nums, target=16).total == 1.0
    wrong_value = countdown("q", "<answer>3 + 5 + 2</answer>", numbers=nums, target=16)
    assert wrong_value.total == 0.0 and wrong_value.components["valid"] == 1.0
    reused = countdown("q", "<answer>(3 + 5) * 2 * 1</answer>", numbers=nums, target=16)
    assert reused.total == 0.0 and reused.components["valid"] == 0.0
    assert countdown("q", "<answer>__import__('os')</answer>", numbers=nums, target=16).total == 0.0
    assert countdown("q", "<answer>5 / (3 - 3) + 2</answer>", numbers=[2, 3, 3, 5], target=1).total == 0.0
    assert countdown("q", "16") is None


def test_reasoning_pattern_reward():
    text = "First, we need to add. Wait, let me check: therefore \\boxed{4}."
    out = reasoning_pattern("q", text)
    assert out.components["phrases"] >= 4 and out.total == pytest.approx(out.components["phrases"] / 20)
    assert reasoning_pattern("q", text + " wait wait wait").components["phrases"] == out.components["phrases"]
    assert reasoning_pattern("q", text.replace("\\boxed{4}", "4")).total == 0.0  # no boxed answer: no reward
    assert reasoning_pattern("q", text + " user: hi").total == 0.0
    repeated = "therefore we need to " + " ".join(["step"] * 60) + " \\boxed{1}"
    assert ngram_repetition_ratio(repeated) > 0.5
    assert reasoning_pattern("q", repeated).total < reasoning_pattern("q", "therefore we need to \\boxed{1}").total


def test_code_exec_runs_tests_in_a_sandbox(tmp_path):
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(good).startswith("def add")
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(1, 1) == 3"]
    assert code_exec_one(good, tests=tests).total == pytest.approx(2 / 3)
    io = [{"input": "3 4\n", "output": "7"}, {"input": "1 1\n", "output": "3"}]
    assert code_exec_one("a, b = map(int, input().split())\nprint(a + b)", tests=io).total == 0.5
    assert code_exec_one("while True: pass", tests=tests, timeout_s=1).total == 0.0
    escape = f"open({str(tmp_path / 'x')!r}, 'w').write('x')\ndef add(a, b): return a + b"
    assert code_exec_one(escape, tests=tests).total == 0.0 and not (tmp_path / "x").exists()
    network = "import socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b): return a + b"
    assert code_exec_one(network, tests=tests).total == 0.0
    assert code_exec_one("x = 'a' * (1 << 34)\ndef add(a, b): return a + b", tests=tests).total == 0.0
    assert code_exec_one(good) is None


def test_in_an_episode_only_the_models_last_turn_is_its_answer():
    """A tool's answer earlier in the transcript is not the model's: math_answer, last_number and answer_after
    score `final_turn` when an episode gives one (rollout/episodes.py)."""
    from rewards.builtin import last_number, math_answer
    from rewards.cot import answer_after

    transcript = 'calc("432 * 650")\ntool\n280800\nassistant\n<tool_call>{"name": "calculator"'
    for fn in (math_answer, last_number):
        assert fn("q", transcript, answer="280800", final_turn='<tool_call>{"name": "calculator"') == 0.0
        assert fn("q", transcript + "\nThe answer is 280800", answer="280800", final_turn="The answer is 280800") == 1.0
    assert last_number("q", "tool\n280800", answer="280800") == 1.0  # single-turn: the completion, as before
    assert answer_after("q", "The answer is 280800 tool", answer="280800", final_turn="The answer is 12") == 0.0
