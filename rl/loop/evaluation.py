"""Held-out evaluation: greedy accuracy, sampled pass@k, mean reward and length.

`accuracy` is the fraction of test prompts whose greedy completion is correct, where "correct" means
the job's first reward gives at least `CORRECT_AT` (1.0 for the built-in answer checkers). With
`eval.samples = N > 1`, N completions per prompt are also sampled, and `pass@k` for each k in `eval.k` (default
1, 2, 4, ... below N, and N) is the unbiased estimate from all N of them, averaged over prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.types import Prompt, RolloutWorker, SamplingParams, Scorer

if TYPE_CHECKING:
    from rl.config.job import JobConfig

Record = dict[str, object]
"""One evaluated sample as written to `<report>.samples.jsonl` (prompt_id, mode, completion, reward, correct)."""

CORRECT_AT = 1.0


def _score(scorer: Scorer, batch: RolloutBatch, primary: str) -> tuple[torch.Tensor, torch.Tensor]:
    result = scorer.score(batch, shaped=False)  # shaping (PAR, clip) is a training transform
    first = torch.nan_to_num(result.components[primary], nan=0.0)
    return result.total, first >= CORRECT_AT


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n >= k samples with c correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement include a correct one.
    Example: n = 5, c = 2, k = 2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def report_ks(samples: int, asked: Sequence[int] | None) -> list[int]:
    """The k's reported from `samples` completions per prompt: pass@1 and the ones asked (sorted, unique), or
    by default 1, 2, 4, ... below `samples`, and `samples` itself."""
    if asked is None:
        asked = [2 ** i for i in range(samples.bit_length()) if 2 ** i < samples] + [samples]
    too_many = [k for k in asked if k > samples]
    if too_many:
        raise UserError(f"pass@{too_many[0]} needs at least {too_many[0]} sampled completions per prompt, but "
                        f"samples={samples}; raise --samples (eval.samples) or ask only for k <= samples (--k).")
    return sorted({1, *asked})


def evaluate(rollout: RolloutWorker, scorer: Scorer, prompts: Sequence[Prompt], job: JobConfig,
             seed: int = 0) -> tuple[dict[str, object], list[Record]]:
    """Greedy and (if job.eval.samples > 1) sampled completions of `prompts`; returns (report, per-sample records)."""
    if not prompts:
        raise UserError("the env has no held-out prompts to evaluate; raise env.test_size.")
    primary = job.rewards[0].label
    max_new = job.eval.max_new_tokens or job.rollout.max_new_tokens
    samples = job.eval.samples
    greedy = rollout.generate(prompts, SamplingParams(1, max_new, stop=tuple(job.rollout.stop), seed=seed, greedy=True))
    total, correct = _score(scorer, greedy, primary)
    report: dict[str, object] = {
        "n": len(prompts), "accuracy": float(correct.double().mean()), "reward_mean": float(total.double().mean()),
        "length_mean": float(greedy.completion_lengths.float().mean()), "samples": samples,
    }
    records = [{"prompt_id": p.prompt_id, "mode": "greedy", "completion": greedy.completion_texts[i],
                "reward": float(total[i]), "correct": bool(correct[i])} for i, p in enumerate(prompts)]
    if samples > 1:
        ks = report_ks(samples, job.eval.k)
        report.update(_sampled(rollout, scorer, prompts, job, samples, ks, seed, primary, max_new, records))
    return report, records


def _sampled(rollout: RolloutWorker, scorer: Scorer, prompts: Sequence[Prompt], job: JobConfig, n: int,
             ks: Sequence[int], seed: int, primary: str, max_new: int, records: list[Record]) -> dict[str, float]:
    """n sampled completions per prompt; pass@k for each k in `ks` from all n of them."""
    params = SamplingParams(n, max_new, temperature=job.eval.temperature, top_p=job.rollout.top_p,
                            top_k=job.rollout.top_k, stop=tuple(job.rollout.stop), seed=seed + 1)
    batch = rollout.generate(prompts, params)
    total, correct = _score(scorer, batch, primary)
    right = [int(c.sum()) for c in correct.view(len(prompts), n)]  # correct samples per prompt
    for i in range(batch.num_samples):
        records.append({"prompt_id": prompts[i // n].prompt_id, "mode": "sampled",
                        "completion": batch.completion_texts[i], "reward": float(total[i]),
                        "correct": bool(correct[i])})
    passes = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in right) / len(prompts) for k in ks}
    return {**passes, "sampled_reward_mean": float(total.double().mean())}


def write_report(report: Mapping[str, object], records: Sequence[Record], out: str | Path) -> Path:
    """The report as JSON at `out` and the per-sample records beside it (`<stem>.samples.jsonl`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_name(out.stem + ".samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def eval_command(target: str, job_name: str, overrides: Sequence[str], samples: int | None, ks: Sequence[int] | None,
                 out: str | None, num_prompts: int | None) -> int:
    """`rl eval TARGET --job JOB`: TARGET is a checkpoint directory, a model directory or an alias. `--samples`
    and `--k` set eval.samples and eval.k, so the job's validation checks them with the rest."""
    from rl.config import load_job
    from rl.loop.standalone import policy_for_target

    flags = ([f"eval.samples={samples}"] if samples else []) + ([f"eval.k={list(ks)}"] if ks else [])
    job = load_job(job_name, [*overrides, *flags])
    with policy_for_target(target, job) as (rollout, scorer, env):
        prompts = list(env.test_prompts())[: num_prompts or job.eval.num_prompts]
        report, records = evaluate(rollout, scorer, prompts, job, seed=job.seed)
    report["target"] = target
    path = write_report(report, records, out or _default_out(target))
    print(json.dumps(report, indent=1))
    print(f"report: {path}")
    return 0


def _default_out(target: str) -> Path:
    folder = Path(target)
    return folder / "eval.json" if (folder / "manifest.json").is_file() else Path("eval.json")
