"""`env:` and `rewards:` — where prompts come from and how completions are scored."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rl.config.base import CustomSection, Section, resolve_existing_file, resolve_import_path

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


class RewardConfig(Section):
    """One reward term: a built-in by `name` or a user function by `import_path`."""

    name: str | None = None
    """A built-in reward (see `rl jobs --rewards`)."""
    import_path: str | None = None
    """`package.module:fn` or `path/to/file.py:fn`."""
    weight: float = 1.0
    timeout_s: float = Field(default=10.0, gt=0)
    """Per-call time limit; a call that runs longer gets the `on_error` fallback."""
    on_error: Literal["zero", "drop_group", "fail"] = "zero"
    """What a failing call (raise, hang, NaN, wrong type) gives the sample."""
    isolate: bool | None = None
    """Run in a worker process; null = yes for user functions, no for built-ins."""
    kwargs: dict[str, object] = Field(default_factory=dict)
    """Extra keyword arguments for the function (its own settings)."""
    memory_mb: int = Field(default=4096, ge=64)
    """Address-space limit of an isolated reward's worker process."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if (self.name is None) == (self.import_path is None):
            raise ValueError("give exactly one of `name` (a built-in reward) or `import_path` (your function)")
        return self

    @model_validator(mode="after")
    def _runs_here(self) -> RewardConfig:
        """A built-in's own start-up check, so `rl validate` and `rl train` refuse before any work (e.g.
        code_exec: the sandbox its kwargs ask for runs on this host). It raises a UserError itself."""
        from rl.registries import REWARDS

        check = getattr(REWARDS.get(self.name), "preflight", None) if self.name is not None else None
        if check is not None:
            check(self.kwargs)
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from rl.registries import REWARDS

        if v is not None and v not in REWARDS:
            raise ValueError(REWARDS.unknown_message(v))
        return v

    @field_validator("import_path")
    @classmethod
    def _importable(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else resolve_import_path(v, info, "reward file", noun="function")

    @property
    def label(self) -> str:
        """The name used in metrics: `reward/<label>/mean`."""
        return self.name or self.import_path.rpartition(":")[2]  # type: ignore[union-attr]


class ShapingConfig(Section):
    """Transformations of the weighted reward sum before advantages."""

    clip: tuple[float, float] | None = None
    """Clip the total reward to [low, high] (before PAR)."""
    par: bool = False
    """PAR (arXiv 2502.18770): sigmoid(k (r - r_ref)) averaged over reference rewards (`ref_rewards` field)."""
    par_k: float = Field(default=1.0, gt=0)
    """PAR's sigmoid slope k."""
    par_max_refs: int | None = Field(default=None, ge=1)
    """Use only the first M reference rewards of each sample (null: all; the paper finds M=1 enough)."""

    @field_validator("clip")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"clip {list(v)}: low must not exceed high")
        return v
