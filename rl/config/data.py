"""`env:` — where prompts come from (rewards: rl/config/rewards.py)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from rl.config.base import CustomSection, Section, resolve_existing_file

Operation = Literal["+", "-", "*"]


def _default_operations() -> list[Operation]:
    return ["+", "-"]


class _EnvCommon(Section):
    system_prompt: str | None = None
    """A system message put before every prompt (null: the env's default)."""
    test_size: int = Field(default=200, ge=0)
    """Prompts held out for evaluation (never trained on)."""


class ArithmeticEnv(_EnvCommon):
    """Integer arithmetic questions generated from the seed (`a op b`)."""

    name: Literal["arithmetic"] = "arithmetic"
    digits: Annotated[int, Field(ge=1, le=9)] | list[Annotated[int, Field(ge=1, le=9)]] = 2
    """Digits per operand; a list (e.g. [1, 2, 3]) mixes difficulties in equal shares of each split."""
    operations: list[Operation] = Field(default_factory=_default_operations)
    train_size: int = Field(default=5000, ge=1)


class CountdownEnv(_EnvCommon):
    """Countdown: combine the given numbers with + - * / to reach the target."""

    name: Literal["countdown"] = "countdown"
    numbers: int = Field(default=3, ge=2, le=6)
    """How many numbers are given (the difficulty knob: each must be used exactly once)."""
    max_number: int = Field(default=20, ge=2)
    """Numbers are drawn from 1..max_number."""
    max_target: int = Field(default=1000, ge=1)
    """Targets are positive integers up to this (reachable by construction)."""
    train_size: int = Field(default=5000, ge=1)


class DatasetEnv(_EnvCommon):
    """Prompts from a local JSONL, Parquet or CSV file (read with the `datasets` library)."""

    name: Literal["dataset"] = "dataset"
    path: str
    prompt_column: str | None = None
    """Column holding the question; null: the format's default (plain: prompt, gsm8k: question, math: problem)."""
    answer_column: str | None = None
    """Column holding the answer (given to rewards as `answer`); null: the format's default (plain: answer if
    present, gsm8k: answer, math: solution)."""
    format: Literal["plain", "gsm8k", "math"] = "plain"
    """`gsm8k` takes the answer after '####', `math` the last \\boxed{} of the solution; `plain` uses it as is."""
    test_path: str | None = None
    """A separate held-out file; null holds out `test_size` rows of `path`."""

    @field_validator("path", "test_path")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else resolve_existing_file(v, info, "dataset file")


class CustomEnv(CustomSection, _EnvCommon):
    """Your own task: `env: {name: custom, import_path: my_env.py:MyEnv, kwargs: {...}}`.

    `import_path` names a factory called as `factory(cfg, tokenizer, seed)` (a class works): `cfg` is this
    section (your settings in `cfg.kwargs`; `cfg.system_prompt`, `cfg.test_size` as for the built-ins),
    `tokenizer` the policy's `PreTrainedTokenizerBase`, `seed` the job seed (derive every random choice from it,
    so a resume sees the same prompts). It returns an object with `train_prompts()` and `test_prompts()`, each a
    sequence of `rl.types.Prompt`. Build a prompt with `envs.base.render_prompt(tokenizer, question,
    cfg.system_prompt, prompt_id, meta)` (applies the chat template once and tokenises) and a stable id with
    `envs.base.stable_id(...)`; `meta` fields reach the rewards as keyword arguments (e.g. `answer`):

        from envs.base import render_prompt, stable_id

        class Repeat:
            def __init__(self, cfg, tokenizer, seed):
                prompts = [render_prompt(tokenizer, f"Repeat the number {i}.", cfg.system_prompt,
                                         stable_id("repeat", i), {"answer": str(i)})
                           for i in range(cfg.kwargs.get("count", 100))]
                self._test, self._train = prompts[:cfg.test_size], prompts[cfg.test_size:]

            def train_prompts(self): return self._train
            def test_prompts(self): return self._test

    The file is loaded and the factory's signature checked when the job is validated (exit 2 on a bad path,
    a missing name or a wrong signature)."""

    registry_name: ClassVar[str] = "ENVS"


EnvConfig = Annotated[ArithmeticEnv | CountdownEnv | DatasetEnv | CustomEnv, Field(discriminator="name")]
