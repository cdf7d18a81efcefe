"""The typed job schema and its loading: YAML (or a built-in job name) + dotted overrides -> JobConfig.

    job = load_job("quickstart", ["trainer.max_steps=5", "rollout.backend=vllm"])

Every problem is collected and reported together, each with its key path, as one `UserError`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from rl.config.job import JobConfig
from rl.config.reward_model_job import RewardModelJob
from rl.errors import UserError

__all__ = ["JobConfig", "apply_overrides", "builtin_jobs", "dump_job", "load_job", "load_rm_job", "validate_job"]


def builtin_jobs() -> dict[str, Path]:
    """Built-in job names -> their YAML files (package data under rl/jobs)."""
    folder = resources.files("rl") / "jobs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def builtin_rm_jobs() -> dict[str, Path]:
    """Built-in `rl train-rm` job names -> their YAML files (rl/jobs/reward_models: never taken for RL jobs)."""
    folder = resources.files("rl") / "jobs" / "reward_models"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")} \
        if folder.is_dir() else {}


def _job_source(job: str, jobs: Mapping[str, Path] | None = None) -> tuple[Path, str]:
    path = Path(job).expanduser()
    if path.is_file():
        return path, path.read_text()
    jobs = builtin_jobs() if jobs is None else jobs
    if job in jobs:
        return jobs[job], jobs[job].read_text()
    raise UserError(f"job {job!r} is neither a YAML file nor a built-in job. Built-in jobs: "
                    f"{', '.join(sorted(jobs))}; or give the path of a YAML job file.")


def _parse_yaml(text: str, where: str) -> dict[str, object]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', exc)}. "
                        "Fix the syntax (indentation, colons, quotes) and run again.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys (name:, model:, ...), not a {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, object], overrides: Iterable[str]) -> dict[str, object]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, booleans, lists, null)."""
    data = copy.deepcopy(data)  # the caller's mapping is left as it was
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key.path=value, e.g. trainer.max_steps=5.")
        try:
            value: object = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node: dict | list = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # `rewards.1.path=...`: an entry of a list, by index
                node = node[_list_index(node, part, item)]
                continue
            child = node.get(part)
            if not isinstance(child, (dict, list)):
                child = {}
                node[part] = child
            node = child
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _list_index(items: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise UserError(f"override {item!r}: {part!r} is not an index of a list of {len(items)} entries "
                        f"(0..{len(items) - 1}); e.g. rewards.0.weight=2.")
    return int(part)


def _key_path(loc: tuple[int | str, ...], data: object) -> str:
    """Dotted path of a pydantic error location, without the union-tag steps pydantic inserts."""
    parts: list[str] = []
    node = data
    for i, step in enumerate(loc):
        if isinstance(node, Mapping) and isinstance(step, str) and step not in node and parts:
            # A discriminated-union tag (e.g. 'ppo_clip') or a validator label, not a key of the input.
            if step in ("function-after", "function-before", "function-wrap") or "[" in step:
                continue
            # (a tag is never the last step; with no `name` given the default variant's tag appears)
            if node.get("name", step if i < len(loc) - 1 else None) == step:
                continue
        parts.append(str(step) if not isinstance(step, int) else f"[{step}]")
        node = node.get(step) if isinstance(node, Mapping) else (
            node[step] if isinstance(node, list) and isinstance(step, int) and step < len(node) else None)
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _section_fields(loc: tuple[int | str, ...], root: type[BaseModel] = JobConfig) -> list[str]:
    """The keys accepted by the section that holds `loc[-1]` (following union tags and list items)."""
    candidates: list[type[BaseModel]] = [root]
    for step in loc[:-1]:
        nxt: list[type[BaseModel]] = []
        for model in candidates:
            if isinstance(step, int) or model is None:
                nxt.append(model)
                continue
            if step in getattr(model, "model_fields", {}):
                nxt.extend(_models_in(model.model_fields[step].annotation))
            elif any(getattr(m, "model_fields", {}).get("name") is not None for m in [model]):
                nxt.append(model)  # a union tag step: stay on the chosen variant
        candidates = [m for m in nxt if m is not None] or candidates
    tag = next((s for s in reversed(loc[:-1]) if isinstance(s, str)), None)
    chosen = [m for m in candidates if "name" in m.model_fields and tag in _literal_names(m)] or candidates
    return sorted(chosen[0].model_fields) if chosen else []


def _literal_names(model: type[BaseModel]) -> tuple[object, ...]:
    return get_args(model.model_fields["name"].annotation)


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The config classes in a field's annotation (through unions, Optional, Annotated and list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _describe(error: ErrorDetails, root: type[BaseModel] = JobConfig) -> str:
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "extra_forbidden":
        keys = _section_fields(tuple(error["loc"]), root)
        close = difflib.get_close_matches(str(error["loc"][-1]), keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; this section accepts: {', '.join(keys)}"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown name {ctx.get('tag')!r}; known: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "missing `name:` (it selects the variant)"
    return msg.removeprefix("Value error, ")


def format_validation_error(exc: ValidationError, data: object, where: str,
                            root: type[BaseModel] = JobConfig) -> str:
    lines = [f"{where} has {exc.error_count()} problem(s):"]
    for error in exc.errors():
        got = error.get("input")
        shown = "" if isinstance(got, (dict, list)) or error["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {_key_path(error['loc'], data)}: {_describe(error, root)}{shown}")
    lines.append("Fix these keys in the job file or with key=value overrides, then run again.")
    return "\n".join(lines)


def validate_job(data: Mapping[str, object], where: str, base_dirs: Iterable[Path] = ()) -> JobConfig:
    try:
        return JobConfig.model_validate(data, context={"base_dirs": [str(d) for d in base_dirs]})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, data, where)) from None


def load_job(job: str, overrides: Iterable[str] = ()) -> JobConfig:
    """Load a job by YAML path or built-in name, apply overrides, validate."""
    path, text = _job_source(job)
    data = apply_overrides(_parse_yaml(text, str(path)), overrides)
    return validate_job(data, str(path), base_dirs=[path.resolve().parent])


def load_rm_job(job: str, overrides: Iterable[str] = ()) -> RewardModelJob:
    """An `rl train-rm` job by YAML path or built-in RM job name, with overrides, validated like `load_job`."""
    path, text = _job_source(job, builtin_rm_jobs())
    data = apply_overrides(_parse_yaml(text, str(path)), overrides)
    try:
        return RewardModelJob.model_validate(data, context={"base_dirs": [str(path.resolve().parent)]})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, data, str(path), RewardModelJob)) from None


def job_to_dict(job: JobConfig) -> dict[str, object]:
    return job.model_dump(mode="json")


def dump_job(job: JobConfig, path: str | Path) -> None:
    """Write the fully resolved job (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(job_to_dict(job), sort_keys=False))
