"""`dataset`: prompts from a local JSONL/JSON, Parquet or CSV file, read with the `datasets` library.

    env: {name: dataset, path: data/train.jsonl, prompt_column: prompt, answer_column: answer}

Every other column travels in `meta` and reaches reward functions as a keyword argument (e.g. `tests`
for `code_exec`, `ref_rewards` for PAR). Presets: `format: gsm8k` (question/answer, the answer after
'####') and `format: math` (problem/solution, the last \\boxed{} of the solution). The test split is
`test_path`, or `test_size` rows held out by a seeded shuffle; train rows whose prompt also appears in
the test split are dropped so the splits are disjoint. A malformed file is a UserError naming the file,
line and column.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from envs.base import render_prompt, stable_id
from rl.errors import UserError
from rl.registries import ENVS
from rl.types import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.data import DatasetEnv as DatasetConfig

log = logging.getLogger(__name__)
Row = tuple[int, dict[str, object]]  # (line number in the file, row: the file's free-form columns)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def after_hashes(text: str) -> str | None:
    """GSM8K: the final answer follows '####' (thousands separators removed)."""
    _, sep, tail = text.rpartition("####")
    return tail.strip().replace(",", "") if sep else None


@dataclass(frozen=True)
class Preset:
    prompt_column: str
    answer_column: str
    extract: Callable[[str], str | None]
    what: str  # what the answer column must contain, for the error message


PRESETS = {
    "plain": Preset("prompt", "answer", lambda s: s, "an answer"),
    "gsm8k": Preset("question", "answer", after_hashes, "'#### <answer>' at the end"),
    "math": Preset("problem", "solution", last_boxed, "a \\boxed{...} answer"),
}


def _read_json(path: Path, text: str) -> list[Row]:
    if text.lstrip().startswith("["):  # one JSON array rather than JSON lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {exc.lineno}, column {exc.colno}: bad JSON ({exc.msg}).") from None
        return [(i + 1, r) for i, r in enumerate(rows)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}, column {exc.colno}: bad JSON ({exc.msg}); each line must be "
                            "one JSON object.") from None
    return out


def _read_table(path: Path, kind: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    reader = {"csv": datasets.Dataset.from_csv, "parquet": datasets.Dataset.from_parquet}[kind]
    with tempfile.TemporaryDirectory(prefix="rlpost-ds-") as cache:
        try:
            table = reader(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - the reader's errors vary by format; all mean a bad file
            raise UserError(f"{path}: cannot be read as {kind.upper()} ({type(exc).__name__}: {exc}).") from None
    first = 2 if kind == "csv" else 1  # CSV line 1 is the header
    return [(first + i, row) for i, row in enumerate(table.to_list())]


READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".jsonl": lambda p: _read_json(p, p.read_text()),
    ".json": lambda p: _read_json(p, p.read_text()),
    ".csv": lambda p: _read_table(p, "csv"),
    ".parquet": lambda p: _read_table(p, "parquet"),
}


def read_rows(path: str) -> list[Row]:
    """(line, row) for every row of a JSONL/JSON/CSV/Parquet file; UserError for an empty or bad file."""
    file = Path(path)
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise UserError(f"{file}: unsupported dataset format {file.suffix!r}; use one of {', '.join(READERS)}.")
    if file.stat().st_size == 0 or (file.suffix.lower() != ".parquet" and not file.read_text().strip()):
        raise UserError(f"{file}: the dataset file is empty (line 1, column 1); it needs at least one row.")
    rows = reader(file)
    if not rows:
        raise UserError(f"{file}: the dataset file has no rows.")
    for number, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{file}: line {number}, column 1: expected a JSON object, got {type(row).__name__}.")
    return rows


def _where(path: str, number: int) -> str:
    return f"{path}: line {number}" if not path.endswith(".parquet") else f"{path}: row {number}"


def to_examples(path: str, rows: list[Row], cfg: DatasetConfig) -> list[tuple[str, dict[str, object]]]:
    """(question, meta) per row: the prompt column checked, the answer extracted, other columns kept."""
    preset = PRESETS[cfg.format]
    prompt_col = cfg.prompt_column or preset.prompt_column
    answer_col = cfg.answer_column or preset.answer_column
    answer_required = cfg.answer_column is not None or cfg.format != "plain"
    out = []
    for number, row in rows:
        for col, required in ((prompt_col, True), (answer_col, answer_required)):
            if required and (col not in row or row[col] is None):
                raise UserError(f"{_where(path, number)}: missing column {col!r} (the row has: "
                                f"{', '.join(map(repr, row)) or 'nothing'}); set env.prompt_column / "
                                "env.answer_column to the file's column names.")
        meta = {k: v for k, v in row.items() if k != prompt_col}
        if row.get(answer_col) is not None:
            answer = preset.extract(str(row[answer_col]))
            if answer is None:
                raise UserError(f"{_where(path, number)}: column {answer_col!r} has no answer in the "
                                f"{cfg.format} format (expected {preset.what}).")
            meta["answer"] = answer
            if answer_col != "answer" or cfg.format != "plain":
                meta["reference_solution"] = row[answer_col]
        out.append((str(row[prompt_col]), meta))
    return out


@ENVS.register("dataset")
class DatasetEnv:
    def __init__(self, cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        examples = to_examples(cfg.path, read_rows(cfg.path), cfg)
        if cfg.test_path is not None:
            test = to_examples(cfg.test_path, read_rows(cfg.test_path), cfg)
            train = examples
        else:
            if cfg.test_size >= len(examples):
                raise UserError(f"{cfg.path} has {len(examples)} rows, not enough to hold out env.test_size="
                                f"{cfg.test_size} and train on the rest; lower env.test_size or add env.test_path.")
            order = list(range(len(examples)))
            random.Random(f"dataset:{seed}").shuffle(order)
            test = [examples[i] for i in order[:cfg.test_size]]
            train = [examples[i] for i in sorted(order[cfg.test_size:])]
        held_out = {q for q, _ in test}
        kept = [e for e in train if e[0] not in held_out]
        if len(kept) < len(train):
            log.info("dataset: dropped %d train rows whose prompt is also in the test split", len(train) - len(kept))
        self._train = self._render(kept, tokenizer, cfg.system_prompt, "train")
        self._test = self._render(test, tokenizer, cfg.system_prompt, "test")

    @staticmethod
    def _render(examples: Sequence[tuple[str, dict[str, object]]], tokenizer: PreTrainedTokenizerBase,
                system: str | None, split: str) -> list[Prompt]:
        return [render_prompt(tokenizer, q, system, stable_id("dataset", split, i, q), meta)
                for i, (q, meta) in enumerate(examples)]

    def train_prompts(self) -> Sequence[Prompt]:
        return self._train

    def test_prompts(self) -> Sequence[Prompt]:
        return self._test
