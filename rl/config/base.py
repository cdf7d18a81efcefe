"""Shared pieces of the job schema: the strict base model and file-path checks."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class Section(BaseModel):
    """A strict, frozen config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              validate_default=True)


def resolve_existing_file(value: str, info: ValidationInfo, what: str) -> str:
    """Absolute path of an existing file, looked up from the working directory, then the job's directory.

    Relative paths in a job are accepted relative to where `rl` runs or to the job file itself, and
    written to the resolved config as absolute paths so a resumed run finds the same file.
    """
    path = Path(value).expanduser()
    bases = [Path.cwd()] + [Path(d) for d in ((info.context or {}).get("base_dirs") or [])]
    candidates = [path] if path.is_absolute() else [b / path for b in bases]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(f"{what} not found: {value!r} (looked at {looked}); give a path relative to the "
                     "directory you run rl from, or an absolute path")
