"""Tools a model calls during an episode: built-ins (`calculator`, `python`) and the user's functions.

A tool is a `Tool`: its `spec` (name, description, JSON-schema parameters: what the model is told) and
`__call__(arguments) -> str`. A `ToolBox` calls them for an episode and never lets one hurt the run: a tool
that raises, hangs past its `timeout_s`, or returns something that is not text gives the model an
`error: ...` observation instead, and the failure is counted (`ToolBox.stats`).

- `calculator`: exact arithmetic on the expression (+ - * / ** and parentheses), in process (a pure parser,
  no eval; envs/multiturn.py's `calculate`).
- `python`: the code runs in the OS sandbox of rl/sandbox.py (the same one as `code_exec`: no network,
  no processes, no view of the run directory or home, limits), its stdout (and a traceback) come back.
- user tools (`import_path`): `fn(**arguments) -> str`, described by its docstring and typed signature, run
  in a spawned worker process (killed and replaced after a timeout), like isolated rewards. User tools are
  the user's code and trusted as such; a tool that runs model-written code must use rl.sandbox.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Protocol, cast

from envs.multiturn import calculate
from rl.registries import TOOLS

if TYPE_CHECKING:
    from rl.config.agent import ToolConfig

JSON_TYPES: Mapping[object, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                                    dict: "object"}
STARTUP_GRACE_S = 60.0  # for spawning a user tool's worker and importing its module
MAX_RESULT_CHARS = 4000  # what a tool may return before it is cut (tokens are cut again by the episode)


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about a tool."""

    name: str
    description: str
    parameters: Mapping[str, object]
    """A JSON schema of the arguments object (`{"type": "object", "properties": ..., "required": [...]}`)."""


class Tool(Protocol):
    spec: ToolSpec

    def __call__(self, arguments: Mapping[str, object]) -> str: ...


def _schema(properties: Mapping[str, str], descriptions: Mapping[str, str]) -> dict[str, object]:
    props = {k: {"type": v, "description": descriptions.get(k, "")} for k, v in properties.items()}
    return {"type": "object", "properties": props, "required": list(properties)}


def _string_argument(arguments: Mapping[str, object], key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str):
        raise ValueError(f"argument {key!r} must be a string")
    return value


class Calculator:
    spec = ToolSpec("calculator", "Evaluate an arithmetic expression exactly: numbers, + - * / ** and parentheses.",
                    _schema({"expression": "string"}, {"expression": "e.g. 123 * 45"}))

    def __call__(self, arguments: Mapping[str, object]) -> str:
        value = calculate(_string_argument(arguments, "expression"))
        return str(int(value)) if float(value).is_integer() else f"{value:.10g}"


PYTHON_RUNNER = """\
import sys, traceback
{limits}
source = open("tool_code.py").read()
try:
    exec(compile(source, "tool_code.py", "exec"), {{"__name__": "__main__"}})
except BaseException:
    traceback.print_exc(limit=-3, file=sys.stdout)
"""


class PythonTool:
    """The model's code in the OS sandbox; what it prints comes back."""

    spec = ToolSpec("python", "Run Python code (standard library only, no network, no files outside its own "
                    "directory) and return what it prints.", _schema({"code": "string"}, {"code": "a Python program"}))

    def __init__(self, timeout_s: float, memory_mb: int = 512, sandbox: str = "bwrap") -> None:
        from rl.sandbox import Limits, SandboxMode, require

        self.mode = cast(SandboxMode, sandbox)
        require(self.mode)
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)

    def __call__(self, arguments: Mapping[str, object]) -> str:
        from rl.sandbox import limits_prelude, run_python

        code = _string_argument(arguments, "code")
        runner = PYTHON_RUNNER.format(limits=limits_prelude(self.limits))
        run = run_python(runner, (), {"tool_code.py": code}, "", self.limits, self.mode)
        if run.timed_out:
            raise TimeoutError(f"the code ran past {self.limits.timeout_s:g}s and was stopped")
        if run.blocked:
            raise PermissionError("the sandbox stopped the code (a process, a socket, a signal or a kernel call "
                                  "it does not allow)")
        if run.returncode and not run.stdout.strip():  # e.g. a crash in C code: say so rather than answer ""
            raise RuntimeError(f"the code died with exit status {run.returncode} and printed nothing")
        return run.stdout


def _python_preflight(kwargs: Mapping[str, object]) -> None:
    from rl.sandbox import SandboxMode, require

    require(cast(SandboxMode, kwargs.get("sandbox", "bwrap")))


def _make_calculator(cfg: ToolConfig) -> Tool:
    return Calculator()


def _make_python(cfg: ToolConfig) -> Tool:
    kw = dict(cfg.kwargs)
    return PythonTool(cfg.timeout_s, int(cast(int, kw.get("memory_mb", 512))), str(kw.get("sandbox", "bwrap")))


_make_python.preflight = _python_preflight  # type: ignore[attr-defined]
TOOLS.register("calculator")(_make_calculator)
TOOLS.register("python")(_make_python)


# --- user tools --------------------------------------------------------------------------------------

def user_spec(fn: Callable[..., object], name: str) -> ToolSpec:
    """A user function's spec: its docstring's first paragraph, and its typed parameters as a schema."""
    doc = inspect.getdoc(fn) or name
    params = inspect.signature(fn).parameters.values()
    kinds = {p.name: JSON_TYPES.get(p.annotation, "string") for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.name in kinds]
    schema = _schema(kinds, {})
    schema["required"] = required
    return ToolSpec(name, doc.split("\n\n")[0].strip(), schema)


_USER_FN: Callable[..., object] | None = None


def _load_user_tool(import_path: str) -> None:
    global _USER_FN
    from rl.plugins import load_object

    _USER_FN = cast(Callable[..., object], load_object(import_path, "tool"))


def _call_user_tool(arguments: dict[str, object]) -> object:
    assert _USER_FN is not None
    return _USER_FN(**arguments)


class UserTool:
    """The user's function in its own spawned worker; a call past `timeout_s` kills and replaces it."""

    def __init__(self, import_path: str, name: str, timeout_s: float) -> None:
        from rl.plugins import load_object

        fn = load_object(import_path, "tool")  # loaded here too: a bad path fails at start-up, with the spec
        if not callable(fn):
            raise TypeError(f"tool {import_path!r} is not a function")
        self.spec = user_spec(fn, name)
        self.import_path, self.timeout_s = import_path, timeout_s
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, arguments: Mapping[str, object]) -> str:
        try:
            result = self._ensure().submit(_call_user_tool, dict(arguments)).result(timeout=self.timeout_s)
        except FutureTimeout:
            self.close()
            raise TimeoutError(f"the tool ran past {self.timeout_s:g}s (its worker was replaced)") from None
        except BrokenProcessPool:
            self.close()
            raise RuntimeError("the tool's worker process died; replaced") from None
        if not isinstance(result, str):
            raise TypeError(f"the tool returned a {type(result).__name__}, not text")
        return result

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_load_user_tool,
                                             initargs=(self.import_path,))
            # start it now: spawning and importing are not the tool's time (timeout_s counts its call only)
            self._pool.submit(int).result(timeout=STARTUP_GRACE_S)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:  # kill first: a hung call never returns by itself
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def build_tool(cfg: ToolConfig) -> Tool:
    if cfg.name is not None:
        return TOOLS.get(cfg.name)(cfg)
    assert cfg.import_path is not None
    return UserTool(cfg.import_path, cfg.label, cfg.timeout_s)


# --- calling -------------------------------------------------------------------------------------------

@dataclass
class ToolBox:
    """The job's tools by name; every call gives text (a result or `error: ...`) and is counted."""

    tools: Mapping[str, Tool]
    stats: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_configs(cls, configs: Sequence[ToolConfig]) -> ToolBox:
        return cls({c.label: build_tool(c) for c in configs})

    @property
    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    def call(self, name: str, arguments: Mapping[str, object]) -> str:
        """The tool's answer, or an error message for the model (unknown tool, bad arguments, failure)."""
        self.stats["calls"] += 1
        tool = self.tools.get(name)
        if tool is None:
            self.stats["errors/unknown_tool"] += 1
            return f"error: no tool named {name!r}; the tools are {sorted(self.tools)}"
        try:
            result = tool(arguments)
        except Exception as exc:  # noqa: BLE001 - a tool's failure goes back to the model as its observation
            self.stats[f"errors/{name}"] += 1
            return f"error: {type(exc).__name__}: {exc}"
        self.stats[f"calls/{name}"] += 1
        return result[:MAX_RESULT_CHARS]

    def close(self) -> None:
        for tool in self.tools.values():
            close = getattr(tool, "close", None)
            if close is not None:
                close()
