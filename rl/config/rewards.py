"""`rewards:` and `shaping:` — how completions are scored.

A reward term is a function (`name` of a built-in or `import_path` of yours, `RewardConfig`), a learned reward
model (`name: reward_model`) or a generative judge behind an OpenAI-compatible endpoint (`name: judge`). All
three share `weight`, `timeout_s` and `on_error`, and each gives one value per sample, logged as
`reward/<label>/mean`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from rl.config.base import Resources, Section, path_candidates, resolve_import_path

SERVICE_REWARDS = ("reward_model", "judge")
"""The `name`s that select a model-backed reward (their own sections); any other name is a reward function."""


class _RewardCommon(Section):
    weight: float = 1.0
    """Its factor in the weighted total (0: logged only, e.g. a verifiable metric beside a reward model)."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Per-call time limit; a call that runs longer gets the `on_error` fallback."""
    on_error: Literal["zero", "drop_group", "fail"] = "zero"
    """What a failing call (raise, hang, NaN, wrong type, a judge that is down) gives the sample."""
    alias: str | None = None
    """Its name in metrics (`reward/<alias>/mean`), needed when a job has two of the same reward; null: the name."""


class RewardConfig(_RewardCommon):
    """A reward function: a built-in by `name` or a user function by `import_path`."""

    name: str | None = None
    """A built-in reward (see `rl jobs --rewards`)."""
    import_path: str | None = None
    """`package.module:fn` or `path/to/file.py:fn`."""
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
        return self.alias or self.name or self.import_path.rpartition(":")[2]  # type: ignore[union-attr]


def _existing_dir(value: str, info: ValidationInfo) -> str:
    """Absolute path of an existing directory, relative to the working directory or the job's directory."""
    for candidate in path_candidates(value, info):
        if candidate.is_dir():
            return str(candidate.resolve())
    raise ValueError(f"reward model directory not found: {value!r}; give a Hugging Face model directory, an "
                     "`rl train-rm` run's export or checkpoint directory, relative to where rl runs or to the job file")


class RewardModelReward(_RewardCommon):
    """A learned reward model: a sequence-classification model with one output (a Hugging Face directory, or an
    `rl train-rm` export or checkpoint) scoring the question and the completion in its own chat template,
    batched. In process under `cluster: local`; its own Ray actor with `resources` under `cluster: ray`
    (where `timeout_s` bounds each batch's call)."""

    name: Literal["reward_model"]
    path: str
    """The reward model's directory."""
    batch_size: int = Field(default=16, ge=1)
    """Texts per forward pass."""
    max_length: int = Field(default=1024, ge=8)
    """Tokens per scored text; longer ones lose their start (the completion's end is what is judged)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where it runs (auto: CUDA when the process sees a GPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    resources: Resources = Field(default_factory=Resources)
    """What its Ray actor asks for under `cluster: ray` (e.g. gpus: 1)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        return _existing_dir(v, info)

    @property
    def label(self) -> str:
        return self.alias or self.name


DEFAULT_JUDGE_PROMPT = (
    "Rate the response to the question from 0 (wrong or useless) to 10 (correct and helpful).\n\n"
    "Question: {question}\n\nResponse: {completion}\n\nAnswer with one line: `Score: N`.")


class JudgeReward(_RewardCommon):
    """A generative judge: an LLM behind an OpenAI-compatible chat endpoint reads `prompt` (filled with the
    question, the completion and the sample's fields) and answers a score that `parse` reads. A judge that is
    down, slow (each request is cut at `timeout_s`), answers HTTP 5xx/429 or garbage is retried after a short
    backoff, then contained like a failing reward (`on_error`): one sample takes at most about
    (retries + 1) x timeout_s. A 4xx answer (wrong model, bad key) is not retried. rewards/judge.py."""

    name: Literal["judge"]
    url: str
    """The endpoint's base URL, e.g. http://127.0.0.1:8000/v1."""
    model: str
    """The model name the endpoint serves."""
    api_key_env: str | None = None
    """The environment variable holding the API key (null: none sent; local servers need none)."""
    prompt: str = DEFAULT_JUDGE_PROMPT
    """The user message: `{question}`, `{completion}`, `{prompt}` (the rendered prompt) and any sample field
    (e.g. `{answer}`) are filled in."""
    system: str | None = None
    """A system message for the judge."""
    parse: str = r"[Ss]core\s*[:=]?\s*(-?\d+(?:\.\d+)?)"
    """A regular expression whose first group is the score (its last match in the answer counts)."""
    score_range: tuple[float, float] | None = (0.0, 10.0)
    """Scores outside [low, high] are garbage (an error, not a reward); null: any number."""
    normalize: bool = True
    """Map `score_range` to [0, 1] (a reward on the scale of the built-in checkers)."""
    max_tokens: int = Field(default=64, ge=1)
    """The judge's answer length limit (room for `Score: N`, or for a short rationale before it)."""
    temperature: float = Field(default=0.0, ge=0)
    """The judge's sampling temperature (0: greedy, the same answer for the same text)."""
    retries: int = Field(default=2, ge=0)
    """Extra tries after a failed request (down, timed out, HTTP 5xx/429, no usable score in the answer)."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once."""

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url {v!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
        return v

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        import string

        try:
            names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt is not a valid template ({exc}); name fields in braces, e.g. {{completion}}, "
                             "and double literal braces: {{ and }}") from None
        if any(name == "" or name.isdigit() for name in names):
            raise ValueError("prompt has a positional placeholder ({} or {0}); name the field, e.g. {completion}")
        return v

    @field_validator("parse")
    @classmethod
    def _one_group(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"parse {v!r} is not a regular expression ({exc})") from None
        if groups < 1:
            raise ValueError(f"parse {v!r} has no group: put the score in parentheses, e.g. 'Score: (\\d+)'")
        return v

    @model_validator(mode="after")
    def _range(self) -> JudgeReward:
        if self.score_range is not None and self.score_range[0] >= self.score_range[1]:
            raise ValueError(f"score_range {list(self.score_range)}: low must be below high")
        if self.normalize and self.score_range is None:
            raise ValueError("normalize: true needs a score_range to map to [0, 1]; give one or set normalize: false")
        return self

    @property
    def label(self) -> str:
        return self.alias or self.name


def _reward_kind(value: object) -> str:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return name if name in SERVICE_REWARDS else "function"


ServiceRewardConfig = Annotated[RewardModelReward | JudgeReward, Field(discriminator="name")]
AnyRewardConfig = Annotated[Annotated[RewardConfig, Tag("function")] | Annotated[RewardModelReward, Tag("reward_model")]
                            | Annotated[JudgeReward, Tag("judge")], Discriminator(_reward_kind)]
"""One entry of `rewards:`: the variant is chosen by `name` (reward_model, judge), any other is a function."""


class ShapingConfig(Section):
    """Transformations of the weighted reward sum before advantages (training only: evaluation reports the
    unshaped total)."""

    clip: tuple[float, float] | None = None
    """Clip the total reward to [low, high] (before PAR)."""
    par: bool = False
    """PAR (arXiv 2502.18770): sigmoid(k (r - r_ref)) averaged over reference rewards (`ref_rewards` field)."""
    par_k: float = Field(default=1.0, gt=0)
    """PAR's sigmoid slope k."""
    par_max_refs: int | None = Field(default=None, ge=1)
    """Use only the first M reference rewards of each sample (null: all; the paper finds M=1 enough)."""
    par_references: Literal["policy", "data"] = "policy"
    """Where the reference rewards come from. `policy` (the paper's): `par_samples` responses per training prompt
    are generated by the reference policy (the initial weights) with the job's own engine and sampling before
    step 1, scored by the job's own weighted reward total, and cached in RUN_DIR/par/ (a resume reuses them);
    `data`: each sample's `ref_rewards` field (a dataset column scored elsewhere)."""
    par_samples: int = Field(default=1, ge=1)
    """Reference responses generated per prompt (`par_references: policy`)."""
    par_refresh_steps: int = Field(default=0, ge=0)
    """Regenerate the references every N steps with the policy of that step (the reference moves with
    training); 0: never, the initial policy stays the reference (the paper)."""

    @field_validator("clip")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"clip {list(v)}: low must not exceed high")
        return v
