"""Learner throughput and memory per rank: `cluster.learners` 2 (FSDP2 over gloo) vs 1, on one scored batch.

    python -m benchmarks.perf.learner_ranks --out benchmarks/results/learner_ranks/results.json   # SmolLM2-135M
    python -m benchmarks.perf.learner_ranks --smoke                # tiny-llama, 1 round, 1 timed step: seconds

Each arm is a fresh set of spawned processes (one per rank; the 1-rank arm is one process with no group), each
building `PolicyLearner(job, model_dir)` as a learner rank does (rl/loop/distributed.py `join_group` first on 2
ranks) and calling `train_step` on the same synthetic scored batch (fixed seed; advantages by
`rl.loop.steps.advantages`): one warm-up step, then `--steps` timed steps. Both arms' jobs are the same job
except `cluster.learners` (checked before anything runs; `algorithm.correction.level` pinned, since `auto`
resolves by where the sampler runs), full fine-tuning, fp32, AdamW.

Figures per arm and round:
- step time: per step, the slowest rank's `train_step` wall time (the ranks start each step together after a
  barrier); median and range over the timed steps; also the CPU seconds of all ranks' processes per step
  (the machine may be shared: CPU time is what the step cost, wall time what it took);
- trained tokens/s: `train/tokens` of the metrics (loss-mask tokens) / step time;
- per rank: parameter bytes held locally (each parameter's local shard: `DTensor.to_local()`), optimizer state
  bytes held locally after the first step (every tensor in `optimizer.state`, local shards), peak RSS (VmHWM)
  and the resident set at the end (VmRSS).
Threads: the same total on both arms: `--threads` (default 2, the cores here) for the 1-rank process, split
evenly over the ranks of the 2-rank arm (1 each). `--rounds` rounds in alternating order (1 2, 2 1, ...); the
ratios (2 ranks / 1 rank, within a round) are the median and range over rounds. The tokens trained per arm are
asserted equal, and so is the first step's loss (relative 1e-4: the same update, up to float reduction order).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

import torch

from benchmarks._report import abba, emit, spread

if TYPE_CHECKING:
    from rl.batch import RolloutBatch
    from rl.config.job import JobConfig

ARMS = ("1", "2")


# ----- the job and the batch (identical for both arms) ------------------------------------------------------
def job_overrides(args: argparse.Namespace, learners: int) -> list[str]:
    """The `tiny` job on `args.model`, full fine-tuning in fp32; only `cluster.learners` differs between arms."""
    return [f"model.path={args.model}", "model.dtype=float32", "adapter=null", f"cluster.learners={learners}",
            "algorithm.correction.level=token", f"trainer.lr={args.lr}", f"trainer.max_steps={args.steps + 1}",
            f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "trainer.device=cpu",
            f"rollout.group_size={args.group}", f"rollout.prompts_per_step={args.groups}", f"seed={args.seed}"]


def load(args: argparse.Namespace, learners: int) -> JobConfig:
    from rl.config import load_job

    return load_job("tiny", job_overrides(args, learners))


def check_same_jobs(one: dict[str, Any], two: dict[str, Any]) -> None:
    """Stop the run if the arms' resolved jobs differ anywhere but `cluster.learners`."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(one), flat(two)
    absent = "<absent>"
    differ = sorted(k for k in a.keys() | b.keys() if k != "cluster.learners" and a.get(k, absent) != b.get(k, absent))
    if differ:
        raise SystemExit("the arms' jobs differ beyond cluster.learners: "
                         + "; ".join(f"{k}: 1 rank {a.get(k, absent)!r}, 2 ranks {b.get(k, absent)!r}"
                                     for k in differ))


def scored_batch(job: JobConfig, vocab: int, args: argparse.Namespace) -> RolloutBatch:
    """`args.groups` groups of `args.group` rows: random tokens, a `args.prompt`-token prompt, completions of
    uneven length (3/4 .. 5/4 of `args.completion`), sampling logprobs near the learner's, rewards 0/1 (fixed
    seed), advantages from the job's algorithm."""
    from rl.batch import RolloutBatch
    from rl.loop import steps

    g = torch.Generator().manual_seed(args.seed)
    rows = args.groups * args.group
    lengths = torch.randint(3 * args.completion // 4, 5 * args.completion // 4 + 1, (rows,), generator=g)
    width = args.prompt + int(lengths.max())
    positions = torch.arange(width).unsqueeze(0)
    attn = positions < (args.prompt + lengths).unsqueeze(1)
    loss = attn & (positions >= args.prompt)
    ids = torch.randint(1, vocab, (rows, width), generator=g) * attn
    sampling = torch.where(loss, -torch.rand(rows, width, generator=g) * 3, torch.zeros(rows, width))
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    batch = RolloutBatch(input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=sampling,
                         prompt_lengths=torch.full((rows,), args.prompt), group_ids=torch.arange(rows) // args.group,
                         policy_version=0, finish_reasons=("stop",) * rows, prompt_texts=("",) * rows,
                         completion_texts=("",) * rows, sample_meta=({},) * rows).validate()
    return steps.advantages(job, batch.with_rewards(rewards))[0]


# ----- what one rank measures -------------------------------------------------------------------------------
def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t`: its local shard for a DTensor (FSDP2's parameters and Adam moments)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One rank's figures (called after the process joined the group, on 2 ranks)."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from rl.loop.learner import PolicyLearner
    from rl.models import resolve_model

    job = load(args, world)
    model_dir = resolve_model(args.model)
    learner = PolicyLearner(job, model_dir)
    batch = scored_batch(job, int(AutoConfig.from_pretrained(model_dir).vocab_size), args)
    params = sum(local_bytes(p) for p in learner.model.parameters())
    times, cpu, metrics = [], [], []
    for _ in range(args.steps + 1):
        if world > 1:
            dist.barrier()  # every rank starts the step together: the slowest rank's time is the step's
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics.append(learner.train_step(batch))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if len(metrics) == 1:
            optim = optimizer_bytes(learner.trainer.optimizer)  # Adam's moments exist after the first step
    return {"rank": rank, "threads": torch.get_num_threads(), "step_s": times, "cpu_s": cpu, "param_bytes": params,
            "optimizer_bytes": optim, "peak_rss_kib": status_kib("VmHWM"), "end_rss_kib": status_kib("VmRSS"),
            "tokens": [m["train/tokens"] for m in metrics], "loss": [m["loss"] for m in metrics],
            "batch_loss_tokens": int(batch.loss_mask.sum()), "rows": int(batch.input_ids.shape[0]),
            "row_tokens": int(batch.attention_mask.sum())}


def _rank(rank: int, world: int, port: int, out: str, args: argparse.Namespace) -> None:
    from rl.loop.distributed import join_group, leave_group

    try:
        torch.set_num_threads(args.threads // world)
        if world > 1:
            join_group(rank, world, "127.0.0.1", port, "cpu", timeout_s=args.timeout)
        result = measure(rank, world, args)
        leave_group()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_arm(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every rank's figures for one arm: `world` fresh spawned processes (a rank that fails fails the run)."""
    from rl.loop.distributed import free_port

    ctx = multiprocessing.get_context("spawn")
    with TemporaryDirectory() as out:
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, out, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(args.timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = [f.read_text() for f in sorted(Path(out).glob("rank*.err"))]
        if errors or any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"{world}-rank arm failed (exit codes {[p.exitcode for p in procs]}):\n"
                             + "\n".join(errors))
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


# ----- one arm's summary and the comparison -----------------------------------------------------------------
def summarise(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))][1:]  # after the warm-up
    tokens = ranks[0]["tokens"][1:]
    mib = lambda b: round(b / 2**20, 2)  # noqa: E731
    return {"step_s": spread([round(s, 4) for s in steps]), "warmup_s": round(max(r["step_s"][0] for r in ranks), 4),
            "cpu_s_all_ranks": spread([round(sum(r["cpu_s"][i] for r in ranks), 4)
                                       for i in range(1, len(ranks[0]["cpu_s"]))]),
            "tokens_per_s": spread([round(t / s, 2) for t, s in zip(tokens, steps)]),
            "tokens_trained": sum(tokens), "first_loss": ranks[0]["loss"][0],
            "threads_per_rank": [r["threads"] for r in ranks],
            "per_rank": [{"rank": r["rank"], "param_mib": mib(r["param_bytes"]),
                          "optimizer_mib": mib(r["optimizer_bytes"]),
                          "param_plus_optimizer_mib": mib(r["param_bytes"] + r["optimizer_bytes"]),
                          "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1),
                          "end_rss_mib": round(r["end_rss_kib"] / 1024, 1)} for r in ranks]}


def compare(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """2 ranks / 1 rank within each round; median and range over rounds (per rank: the largest rank's)."""
    def ratio(key: str, field: str | None = None) -> dict[str, Any]:
        def value(arm: dict[str, Any]) -> float:
            return (max(r[key] for r in arm["per_rank"]) if field is None else arm[key][field])
        return spread([round(value(r["2"]) / value(r["1"]), 4) for r in rounds])
    return {"step_time_2_over_1": ratio("step_s", "median"),
            "cpu_s_2_over_1": ratio("cpu_s_all_ranks", "median"),
            "tokens_per_s_2_over_1": ratio("tokens_per_s", "median"),
            "param_per_rank_2_over_1": ratio("param_mib"), "optimizer_per_rank_2_over_1": ratio("optimizer_mib"),
            "param_plus_optimizer_per_rank_2_over_1": ratio("param_plus_optimizer_mib"),
            "peak_rss_per_rank_2_over_1": ratio("peak_rss_mib")}


def check_same_work(rounds: list[dict[str, dict[str, Any]]]) -> None:
    first = rounds[0]["1"]
    for r in rounds:
        for arm in ARMS:
            if r[arm]["tokens_trained"] != first["tokens_trained"]:
                raise SystemExit(f"unequal work: {arm} rank(s) trained {r[arm]['tokens_trained']} tokens, "
                                 f"1 rank {first['tokens_trained']}")
            if abs(r[arm]["first_loss"] - first["first_loss"]) > 1e-4 * max(abs(first["first_loss"]), 1e-6):
                raise SystemExit(f"different first update: loss {r[arm]['first_loss']} ({arm} rank(s)) vs "
                                 f"{first['first_loss']} (1 rank)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=4, help="groups in the batch (even: each rank gets half)")
    parser.add_argument("--group", type=int, default=4, help="samples per group")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--completion", type=int, default=64, help="mean completion tokens (3/4 .. 5/4 of it)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both arms, alternating order")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in total per arm, split over ranks")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per arm (and per collective)")
    parser.add_argument("--smoke", action="store_true", help="tiny-llama, 1 round, 1 timed step, 2 groups of 2")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.groups, args.group, args.prompt, args.completion = "tiny-llama", 2, 2, 8, 8
        args.steps, args.rounds, args.timeout = 1, 1, 120
    if args.threads % 2:
        parser.error("--threads must be even (the 2-rank arm splits them evenly)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    check_same_jobs(load(args, 1).model_dump(mode="json"), load(args, 2).model_dump(mode="json"))
    rounds: list[dict[str, dict[str, Any]]] = [{} for _ in range(args.rounds)]
    partial = Path(args.out or ".").with_suffix(".partial.json")
    for i, arm in enumerate(abba(ARMS, args.rounds)):
        rounds[i // len(ARMS)][arm] = summary = summarise(run_arm(int(arm), args))
        print(f"round {i // len(ARMS)} arm {arm}: step {summary['step_s']['median']:.3f} s, "
              f"{summary['tokens_per_s']['median']:.1f} tok/s, per rank "
              + ", ".join(f"{r['param_plus_optimizer_mib']} MiB p+o / {r['peak_rss_mib']} MiB peak RSS"
                          for r in summary["per_rank"]), flush=True)
        if args.out:  # a run stopped part-way (it takes minutes per arm) keeps the arms it finished
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"args": vars(args), "finished_arms": i + 1, "rounds": rounds}, indent=1))
    check_same_work(rounds)
    one = rounds[0]["1"]
    emit({"benchmark": "learner_ranks", "args": vars(args), "job_overrides": job_overrides(args, 2),
          "threads": {"1": rounds[0]["1"]["threads_per_rank"], "2": rounds[0]["2"]["threads_per_rank"]},
          "tokens_trained_per_arm": one["tokens_trained"], "ratios": compare(rounds), "rounds": rounds,
          "step_s_median_over_rounds": {arm: statistics.median(r[arm]["step_s"]["median"] for r in rounds)
                                        for arm in ARMS}}, args.out)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
