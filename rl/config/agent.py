"""`agent:` — multi-turn episodes with tools: the model acts, a tool answers, the model goes on.

null (the default) = single-turn: one completion per sample. Set, every sample is an episode of up to
`max_turns` model turns; a turn that ends in a tool call gets the tool's answer appended as context (never
trained on) and the model continues, token-in/token-out (rollout/episodes.py, envs/tools.py).
"""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rl.config.base import Section, resolve_import_path


class ToolConfig(Section):
    """One tool: a built-in by `name` (`calculator`, `python`) or your function by `import_path`."""

    name: str | None = None
    """A built-in tool: `calculator` (+ - * / ** and parentheses, exact integers) or `python` (runs the code in
    the OS sandbox of rl/sandbox.py and returns its stdout)."""
    import_path: str | None = None
    """`package.module:fn` or `file.py:fn`: `fn(**arguments) -> str`, with a docstring (the description the model
    sees) and typed parameters (its argument schema). It runs in a worker process, timed out like rewards."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Per-call time limit; a call that runs longer returns an error to the model (and is counted)."""
    kwargs: dict[str, object] = Field(default_factory=dict)
    """Settings of the tool (the python tool: `memory_mb`, `sandbox: bwrap|python_only`)."""

    @model_validator(mode="after")
    def _one_source(self) -> ToolConfig:
        if (self.name is None) == (self.import_path is None):
            raise ValueError("give exactly one of `name` (a built-in tool) or `import_path` (your function)")
        if self.name is not None:
            from rl.registries import TOOLS

            if self.name not in TOOLS:
                raise ValueError(TOOLS.unknown_message(self.name))
            check = getattr(TOOLS.get(self.name), "preflight", None)  # the python tool: its sandbox runs here
            if check is not None:
                check(self.kwargs)
        return self

    @field_validator("import_path")
    @classmethod
    def _importable(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else resolve_import_path(v, info, "tool file", noun="function")

    @property
    def label(self) -> str:
        """The tool's name as the model calls it."""
        return self.name or self.import_path.rpartition(":")[2]  # type: ignore[union-attr]


class OpenAIAgentConfig(Section):
    """Your agent, written against the OpenAI client, as the episode: rlpost serves the policy on a loopback
    chat-completions endpoint and trains on exactly the tokens it served (rollout/endpoint_rollout.py)."""

    import_path: str
    """`package.module:run` or `file.py:run`: `run(client: openai.OpenAI, question: str, fields: dict) -> None`
    drives one episode's conversation through `client.chat.completions.create` (any `model` name; sampling is the
    job's: leave temperature and top_p unset). `fields` are the prompt's reward fields (e.g. `answer`)."""
    concurrency: int = Field(default=16, ge=1)
    """Episodes run at once (each on a thread); their turns share engine calls."""
    timeout_s: float = Field(default=120.0, gt=0)
    """Per-episode time limit; an agent that runs longer (or raises) ends its episode with what it had (finish
    reason `abort`, counted in the row's `agent_timeout` / `agent_error`)."""

    @field_validator("import_path")
    @classmethod
    def _loads(cls, v: str, info: ValidationInfo) -> str:
        from rl.errors import UserError
        from rl.plugins import load_callable

        path = resolve_import_path(v, info, "agent file", noun="run")
        try:
            load_callable(path, "openai agent", ("client", "question", "fields"))
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return path


class VerifiersConfig(Section):
    """A `verifiers` environment as the episodes: its own dataset gives the prompts, its own rollout (single-turn,
    multi-turn, tool envs) talks to the policy on a loopback chat-completions endpoint, its rubric scores them (the
    `verifiers` reward reads the score); the learner trains on exactly the served tokens (rollout/verifiers_rollout.py).
    Needs rlpost's `verifiers` extra."""

    env: str
    """The environment: an installed module or env id exposing `load_environment(**kwargs)` (as `vf.load_environment`
    finds it: `my-env` -> module `my_env`), or `path/to/file.py` (relative to the job file) defining it."""
    kwargs: dict[str, object] = Field(default_factory=dict)
    """Arguments of `load_environment`."""
    concurrency: int = Field(default=16, ge=1)
    """Episodes run at once (on one event loop); their turns share engine calls."""
    timeout_s: float = Field(default=120.0, gt=0)
    """Per-episode time limit; a longer episode ends with what it had (finish reason `abort`, `agent_timeout`)."""

    @field_validator("env")
    @classmethod
    def _findable(cls, v: str, info: ValidationInfo) -> str:
        from importlib.util import find_spec

        from rl.config.base import resolve_existing_file

        if v.endswith(".py"):
            return resolve_existing_file(v, info, "verifiers environment file")
        module = v.replace("-", "_").split("/")[-1]  # verifiers' own env id -> module rule
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ValueError(f"verifiers environment {v!r}: no module {module!r} is installed; install the env's "
                             f"package (e.g. `prime env install {v}` or `pip install -e path/to/{module}`), or give "
                             "a path to a .py file that defines load_environment")
        return v


class AgentConfig(Section):
    """Episodes of several model turns with tools."""

    tools: list[ToolConfig] = Field(default_factory=list)
    """The tools the model may call (none: turns end the episode; still multi-turn for custom envs)."""
    max_turns: int = Field(default=4, ge=1)
    """Most model turns per episode; an episode still calling tools after this ends with finish reason
    `length` (the turn budget ran out)."""
    max_total_tokens: int | None = Field(default=None, ge=1)
    """Most tokens after the prompt (model and tool tokens together); null = rollout.max_new_tokens x
    max_turns (for `openai_agent` / `verifiers` episodes: no budget). An episode that reaches it is cut there
    (finish reason `length`, truncation `token_budget`). The engine must accept the
    prompt plus this many tokens as a prompt: rollout.max_prompt_tokens (and vLLM's max_model_len) must be
    large enough (checked)."""
    max_observation_tokens: int = Field(default=128, ge=1)
    """A tool's answer is cut to this many tokens (a tool returning garbage cannot flood the context)."""
    system_prompt: str | None = None
    """What the model is told about its tools, put before the env's own system prompt; null = generated
    from the tools' names, descriptions and argument schemas, with the call format."""
    prefill: str | None = None
    """Text that starts the model's first turn of every episode (train and eval), e.g. the opening of a tool
    call `<tool_call>{"name": "calculator", "arguments": {"expression": "`: the model continues it. It is
    context (never trained on), part of the turn the tools parse and of the transcript the rewards score, and
    counts toward `max_total_tokens`. For a small model that never calls a tool on its own, it gives RL a call
    to reinforce (the `tool_use` job); null = the model starts its turn freely."""
    tool_format: str = "auto"
    """How tools are described and calls written (rl/tool_format.py): `auto` = the chat template's own tool
    syntax where it has one (`hermes`: Qwen2.5/Hermes `<tool_call>` JSON; `llama3_json`), else `tags` (rlpost's
    documented `<tool_call>{"name": ..., "arguments": ...}</tool_call>` with a generated description)."""
    openai_agent: OpenAIAgentConfig | None = None
    """Set: each episode is your OpenAI-client agent's conversation (its own tools, its own turns, at most
    `max_turns` completions); null = rlpost's tool episodes over `tools`."""
    verifiers: VerifiersConfig | None = None
    """Set: each episode is a `verifiers` environment's rollout (its prompts, turns, tools and rubric)."""

    @field_validator("tool_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from rl.tool_format import AUTO, CALL_FORMATS

        if v != AUTO and v not in CALL_FORMATS:
            raise ValueError(CALL_FORMATS.unknown_message(v) + f" (or {AUTO!r})")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> AgentConfig:
        labels = [t.label for t in self.tools]
        if len(set(labels)) != len(labels):
            raise ValueError(f"agent.tools: two tools share a name ({labels}); the model could not tell them apart")
        served = [k for k in ("openai_agent", "verifiers") if getattr(self, k) is not None]
        if len(served) > 1:
            raise ValueError("agent.openai_agent and agent.verifiers are both set: an episode is one or the other")
        if self.verifiers is not None and self.tools:
            raise ValueError("agent.tools and agent.verifiers are both set: a verifiers environment brings its own "
                             "tools; remove agent.tools")
        if self.prefill is not None and served:
            raise ValueError(f"agent.prefill applies to rlpost's tool episodes; agent.{served[0]} writes its own "
                             f"messages: remove agent.prefill (or agent.{served[0]})")
        if self.openai_agent is not None and self.tools:
            raise ValueError("agent.tools and agent.openai_agent are both set: an OpenAI-client agent calls its own "
                             "tools; remove agent.tools (or openai_agent to use rlpost's tool episodes)")
        return self
