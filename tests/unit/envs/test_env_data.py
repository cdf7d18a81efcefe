"""Generated envs are deterministic and solvable; dataset files in every format, presets and clear errors."""

import itertools
import json
import operator

import pytest

from envs.countdown import CountdownEnv
from envs.dataset import DatasetEnv, after_hashes, last_boxed
from rl.config.data import CountdownEnv as CountdownConfig
from rl.config.data import DatasetEnv as DatasetConfig
from rl.errors import UserError

OPS = (operator.add, operator.sub, operator.mul, lambda a, b: a / b if b else float("nan"))


def reachable(numbers):
    """All values of + - * / expressions using every number once (brute force, small inputs)."""
    if len(numbers) == 1:
        return {float(numbers[0])}
    out = set()
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for op in OPS:
            out |= reachable([*rest, op(numbers[i], numbers[j])])
    return out


def test_countdown_is_deterministic_disjoint_and_solvable(tiny_tokenizer):
    cfg = CountdownConfig(numbers=3, max_number=10, test_size=10, train_size=40)
    a, b = CountdownEnv(cfg, tiny_tokenizer, seed=3), CountdownEnv(cfg, tiny_tokenizer, seed=3)
    assert [p.token_ids for p in a.train_prompts()] == [p.token_ids for p in b.train_prompts()]
    assert [p.prompt_id for p in CountdownEnv(cfg, tiny_tokenizer, seed=4).train_prompts()] != \
        [p.prompt_id for p in a.train_prompts()]
    test_ids = {p.prompt_id for p in a.test_prompts()}
    assert len(test_ids) == 10 and not test_ids & {p.prompt_id for p in a.train_prompts()}
    for p in a.test_prompts():
        assert float(p.meta["target"]) in reachable(list(p.meta["numbers"]))
        assert str(p.meta["target"]) in p.text and tiny_tokenizer.decode(list(p.token_ids)) == p.text


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import datasets

        getattr(datasets.Dataset.from_list(rows), "to_" + path.suffix[1:])(str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_dataset_formats_splits_and_extra_columns(tiny_tokenizer, tmp_path, suffix):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(30)]
    path = write_rows(tmp_path / f"data{suffix}", rows)
    cfg = DatasetConfig(path=path, test_size=6, system_prompt="Be brief.")
    env = DatasetEnv(cfg, tiny_tokenizer, seed=0)
    train, test = env.train_prompts(), env.test_prompts()
    assert len(test) == 6 and len(train) == 24
    assert not {p.meta["question"] for p in test} & {p.meta["question"] for p in train}
    p = train[0]
    assert p.meta["answer"] == str(int(p.meta["question"].split()[2]) + 1) and p.meta["level"] in (0, 1, 2)
    assert "Be brief." in p.text and "prompt" not in p.meta
    again = DatasetEnv(cfg, tiny_tokenizer, seed=0)
    assert [q.prompt_id for q in again.test_prompts()] == [q.prompt_id for q in test]


def test_dataset_test_path_and_duplicates_are_disjoint(tiny_tokenizer, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": f"q{i % 5}", "answer": "1"} for i in range(10)])
    test = write_rows(tmp_path / "test.jsonl", [{"prompt": "q0", "answer": "1"}])
    env = DatasetEnv(DatasetConfig(path=train, test_path=test), tiny_tokenizer, seed=0)
    assert len(env.test_prompts()) == 1 and len(env.train_prompts()) == 8  # both copies of q0 dropped


def test_answer_extraction_presets():
    assert after_hashes("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert last_boxed("first \\boxed{1}, finally \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("no box") is None and after_hashes("no hashes") is None


@pytest.mark.parametrize("name, content, cfg, message", [
    ("bad.jsonl", '{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2,,}\n', {}, "line 3, column 29"),
    ("bad.jsonl", '{"prompt": "a"}\n["not", "an", "object"]\n', {}, "line 2, column 1: expected a JSON object"),
    ("bad.jsonl", "   \n", {}, "is empty"),
    ("bad.jsonl", '{"prompt": "a", "answer": "1"}\n{"answer": "2"}\n', {}, "line 2: missing column 'prompt'"),
    ("bad.csv", "question,answer\nq,1\n", {}, "line 2: missing column 'prompt'"),
    ("bad.jsonl", '{"prompt": "a"}\n', {"answer_column": "label"}, "line 1: missing column 'label'"),
    ("bad.jsonl", '{"question": "a", "answer": "7"}\n', {"format": "gsm8k"}, "line 1: column 'answer' has no"),
    ("bad.txt", "x", {}, "unsupported dataset format"),
])
def test_malformed_files_name_file_line_and_column(tiny_tokenizer, tmp_path, name, content, cfg, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        DatasetEnv(DatasetConfig(path=str(path), test_size=0, **cfg), tiny_tokenizer, seed=0)
    assert str(path) in str(err.value)


def test_too_few_rows_for_the_test_split(tiny_tokenizer, tmp_path):
    path = write_rows(tmp_path / "small.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(UserError, match=r"lower env\.test_size"):
        DatasetEnv(DatasetConfig(path=path, test_size=1), tiny_tokenizer, seed=0)
