"""Run logging: `metrics.jsonl` (the on-disk contract), wandb, a rich progress bar, and the final plot.

wandb is imported here and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.config.reward_model_job import RewardModelJob

    LoggedJob = JobConfig | RewardModelJob
    """The runs that log: `rl train` jobs and `rl train-rm` jobs (both have `name`, `logging`, `model_dump`)."""

console = Console(stderr=True)
BAR_KEYS = (("reward/mean", "reward"), ("eval/accuracy", "acc"), ("loss", "loss"), ("time/step_s", "s/step"))


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not measured / not finite"
    return value


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl and mirrors it to wandb and the progress bar."""

    def __init__(self, run_dir: str | Path, job: LoggedJob, total_steps: int, start_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._wandb = _start_wandb(job, Path(run_dir))
        self._progress = None
        if job.logging.progress:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(job.name, total=total_steps, completed=start_step, info="")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines for steps after the checkpoint so the file has each step once."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if self._progress is not None:
            info = "  ".join(f"{label} {metrics[k]:.3g}" for k, label in BAR_KEYS
                             if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]))
            self._progress.update(self._task, completed=step, info=info)

    def note(self, message: str) -> None:
        console.print(message, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _start_wandb(job: LoggedJob, run_dir: Path) -> Any:
    cfg = job.logging.wandb
    if cfg.mode == "disabled":
        return None
    import wandb

    mode = cfg.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        console.print("wandb: no WANDB_API_KEY set, logging offline (sync later with `wandb sync`).")
        mode = "offline"
    return wandb.init(project=cfg.project, entity=cfg.entity, name=job.name, dir=str(run_dir), mode=mode,
                      config=job.model_dump(mode="json"), reinit="finish_previous")


def plot_run(run_dir: str | Path) -> Path | None:
    """Reward, held-out accuracy, KL and step time over steps, as `run_dir/training.png`."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "reward"), ("eval/accuracy", "held-out accuracy"), ("kl", "KL to reference"),
              ("policy/mismatch_kl", "sampler/learner KL"), ("time/step_s", "seconds per step")]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
