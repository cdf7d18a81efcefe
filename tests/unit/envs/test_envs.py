import json

import pytest

from rl.config import load_job
from rl.errors import UserError
from rl.loop.runtime import build_env
from rl.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def env_for(tokenizer, **env):
    job = load_job("tiny", [f"env={json.dumps(env)}"])
    return build_env(job, tokenizer)


def test_arithmetic_is_deterministic_with_disjoint_splits(tokenizer):
    a = env_for(tokenizer, name="arithmetic", digits=2, test_size=50, train_size=300)
    b = env_for(tokenizer, name="arithmetic", digits=2, test_size=50, train_size=300)
    assert [p.text for p in a.train_prompts()] == [p.text for p in b.train_prompts()]
    test_q = {p.meta["question"] for p in a.test_prompts()}
    assert len(test_q) == 50 and not test_q & {p.meta["question"] for p in a.train_prompts()}
    p = a.train_prompts()[0]
    x, op, y = p.meta["question"].split("?")[0].removeprefix("What is ").split()
    assert str(eval(f"{x}{op}{y}")) == p.meta["answer"]
    assert tokenizer.decode(list(p.token_ids)) == p.text and "<|im_start|>assistant" in p.text


def test_countdown_puzzles_are_solvable_by_construction(tokenizer):
    env = env_for(tokenizer, name="countdown", numbers=3, test_size=5, train_size=20)
    assert len(env.test_prompts()) == 5 and len(env.train_prompts()) == 20
    assert all(len(p.meta["numbers"]) == 3 and p.meta["target"] > 0 for p in env.train_prompts())


def test_dataset_jsonl_presets_and_extra_columns(tokenizer, tmp_path):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"work...\n#### {i * 10:,}", "source": "s"} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    env = env_for(tokenizer, name="dataset", path=str(data), prompt_column="question", format="gsm8k", test_size=5)
    assert len(env.test_prompts()) == 5 and len(env.train_prompts()) == 15
    answers = {p.meta["answer"] for p in list(env.train_prompts()) + list(env.test_prompts())}
    assert "150" in answers and all(p.meta["source"] == "s" for p in env.train_prompts())


def test_dataset_math_preset_and_csv(tokenizer, tmp_path):
    data = tmp_path / "math.csv"
    data.write_text('problem,solution\n"1+1","so \\\\boxed{\\\\frac{2}{1}}"\n"2+2","\\\\boxed{4}"\n')
    env = env_for(tokenizer, name="dataset", path=str(data), prompt_column="problem", answer_column="solution",
                  format="math", test_size=1)
    answers = {p.meta["answer"] for p in list(env.train_prompts()) + list(env.test_prompts())}
    assert answers == {"\\\\frac{2}{1}", "4"} or answers == {"\\frac{2}{1}", "4"}


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n', "line 2, column"),
    ("", "is empty"),
    ('{"question": "a", "answer": "1"}\n', "missing column 'prompt'"),
])
def test_malformed_dataset_files_name_file_line_and_column(tokenizer, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        env_for(tokenizer, name="dataset", path=str(data))
    assert str(data) in str(err.value)
