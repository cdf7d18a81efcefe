"""Shared pieces of the job schema: the strict base model and file-path checks."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    """A strict, frozen config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              validate_default=True)


def path_candidates(value: str, info: ValidationInfo) -> list[Path]:
    """Where a job's relative path may point: the working directory, then the job file's directory."""
    path = Path(value).expanduser()
    bases = [Path.cwd()] + [Path(d) for d in ((info.context or {}).get("base_dirs") or [])]
    return [path] if path.is_absolute() else [b / path for b in bases]


def resolve_existing_file(value: str, info: ValidationInfo, what: str) -> str:
    """Absolute path of an existing file, looked up from the working directory, then the job's directory.

    Relative paths in a job are accepted relative to where `rl` runs or to the job file itself, and
    written to the resolved config as absolute paths so a resumed run finds the same file.
    """
    candidates = path_candidates(value, info)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(f"{what} not found: {value!r} (looked at {looked}); give a path relative to the "
                     "directory you run rl from, or an absolute path")


def resolve_import_path(value: str, info: ValidationInfo, what: str, noun: str = "name") -> str:
    """`package.module:name` as given, or `file.py:name` with the file resolved as `resolve_existing_file` does
    (`what` names the file in the error); the loading itself (rl/plugins.py) happens later."""
    target, sep, attr = value.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"import_path {value!r} must look like 'package.module:{noun}' or 'file.py:{noun}'")
    if target.endswith(".py"):
        return f"{resolve_existing_file(target, info, what)}:{attr}"
    return value


class CustomSection(Section):
    """The `custom` variant of a plug-in family: user code named by `import_path`, with its own settings.

    Subclasses (CustomLoss, CustomAdvantage, CustomEnv) name their registry in `registry_name` (an attribute
    of rl.registries); validation loads the code and checks its signature, so a bad path, a missing name or a
    wrong signature is an error at this key (exit 2), before any model is loaded.
    """

    registry_name: ClassVar[str] = ""
    name: Literal["custom"] = "custom"
    import_path: str
    """`package.module:name` or `path/to/file.py:name` (a path relative to where rl runs or to the job file)."""
    kwargs: dict[str, object] = Field(default_factory=dict)
    """Settings of your code, free-form: read them from the config section it receives (`cfg.kwargs`)."""

    @field_validator("import_path")
    @classmethod
    def _resolved(cls, v: str, info: ValidationInfo) -> str:
        return resolve_import_path(v, info, "custom code file")

    @model_validator(mode="after")
    def _loads(self) -> CustomSection:
        from rl import registries
        from rl.errors import UserError

        registry = getattr(registries, self.registry_name)  # a ClassVar of the subclass, not user input
        try:
            registry.resolve(self.name, self.import_path)
        except UserError as exc:
            raise ValueError(str(exc)) from None  # reported at this key by the job loader
        return self


class Resources(Section):
    """What one actor asks Ray for."""

    gpus: float = Field(default=0.0, ge=0)
    """GPUs per actor (Ray sets CUDA_VISIBLE_DEVICES to the ones it grants); 0 on a CPU-only cluster."""
    cpus: float = Field(default=0.0, ge=0)
    """Ray CPU slots per actor; 0 lets small machines schedule everything (torch threads are set explicitly)."""
