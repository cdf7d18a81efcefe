"""The `rl train-rm` job: Bradley-Terry reward-model training on a preference file.

    name: my_rm
    model: {path: smollm2-135m-instruct}
    adapter: {name: lora, r: 16}          # null = full fine-tuning
    data: {path: prefs.jsonl}             # columns prompt (optional), chosen, rejected
    train: {lr: 1.0e-4, batch_size: 8, epochs: 1}

The model is the backbone with a fresh scalar head (rl.models.new_reward_model); its export (RUN_DIR/export) is
what `rewards: [{name: reward_model, path: RUN_DIR/export}]` loads. Loaded by rl.config.load_rm_job.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from rl.config.adapters import AdapterConfig
from rl.config.base import Section, resolve_existing_file
from rl.config.job import LoggingConfig, ModelConfig

PREFERENCE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the `datasets` builder that reads it."""


def _preference_file(value: str, info: ValidationInfo) -> str:
    path = resolve_existing_file(value, info, "preference file")
    if not path.endswith(tuple(PREFERENCE_FORMATS)):
        raise ValueError(f"preference file {value!r} must end in one of {', '.join(PREFERENCE_FORMATS)} "
                         "(JSON lines, Parquet or CSV)")
    return path


class PreferenceData(Section):
    """The preference pairs: one row per pair, the preferred response in `chosen`."""

    path: str
    """A JSONL, Parquet or CSV file (read through `datasets`), relative to where rl runs or to the job file."""
    prompt_column: str | None = "prompt"
    """The question both responses answer; a file without this column (or null here) scores the responses alone."""
    chosen_column: str = "chosen"
    """The preferred response."""
    rejected_column: str = "rejected"
    """The other response."""
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of the pairs held out for pairwise accuracy (a split fixed by `train.seed`); unused with `test_path`."""
    test_path: str | None = None
    """A separate held-out preference file (same columns) instead of `test_fraction`."""

    @field_validator("path", "test_path")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _preference_file(v, info)


class RMTrainConfig(Section):
    """The optimisation: AdamW on the Bradley-Terry loss, mean of -log sigmoid(r_chosen - r_rejected)."""

    lr: float = Field(default=1e-5, gt=0)
    """AdamW learning rate (constant)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW decoupled weight decay."""
    batch_size: int = Field(default=8, ge=1)
    """Preference pairs per optimizer step (each step scores 2 x batch_size texts)."""
    epochs: int = Field(default=1, ge=1)
    """Passes over the training pairs, each in a fresh order drawn from `seed`; ignored when `max_steps` is set."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps in all (the data repeats in fresh orders as needed); null = `epochs` full passes."""
    max_length: int = Field(default=1024, ge=8)
    """Tokens per scored text; longer ones lose their start (rl.reward_model.encode), as when the reward scores."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping by global norm."""
    seed: int = 0
    """Seeds the scalar head's (and adapter's) initialisation, the held-out split and the data order."""
    eval_every: int = Field(default=0, ge=0)
    """Held-out pairwise accuracy and loss every N steps (0 = only at the end, which always runs)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """A checkpoint every N steps (0 = only at the end, which always writes one)."""
    keep_last: int = Field(default=2, ge=1)
    """Checkpoints kept (older ones are pruned)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model trains (auto: CUDA when the process sees a GPU)."""


class RewardModelJob(Section):
    """An `rl train-rm` job."""

    name: str = "reward_model"
    """The run's name (its run directory is runs/<name> unless `run_dir` is set)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The causal-LM backbone the scalar head is put on."""
    adapter: AdapterConfig | None = None
    """null = full fine-tuning; `lora` trains LoRA on the backbone and the scalar head in full."""
    data: PreferenceData
    train: RMTrainConfig = Field(default_factory=RMTrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    run_dir: str | None = None
    """Where checkpoints, metrics.jsonl, eval/ and export/ go; null = runs/<name>."""

    @field_validator("adapter")
    @classmethod
    def _lora_only(cls, v: AdapterConfig | None) -> AdapterConfig | None:
        if v is not None and v.name != "lora":
            raise ValueError(f"adapter {v.name!r} is not available for reward models (it is wired and tested for "
                             "causal-LM policies only); use `adapter: {name: lora, ...}`, or null for full fine-tuning")
        return v

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"
