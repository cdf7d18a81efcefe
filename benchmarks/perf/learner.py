"""Learner step time and memory: `PolicyTrainer.step` on a synthetic scored batch.

    python -m benchmarks.perf.learner                                  # tiny-llama and SmolLM2-135M
    python -m benchmarks.perf.learner --models tiny-llama --rows 16 --completion 128 --steps 5

One JSON line per model: seconds per learner step (mean and min over the timed steps; the first step is a
warm-up), loss tokens per second, and the process's peak RSS after the model (full fine-tuning, fp32,
AdamW, one optimizer update per step). Peak RSS is a high-water mark over the whole process, so models
run smallest first and each line's figure includes what earlier models left.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from benchmarks._report import emit


def synthetic_batch(rows: int, prompt: int, completion: int, group: int, vocab: int, seed: int = 0):
    """Random tokens, uneven completion lengths (completion/2 .. completion), rewards 0/1, GRPO advantages."""
    from rl.batch import RolloutBatch
    from rl.config.algorithm import GRPOAdvantage
    from trainers.advantages import grpo

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(completion // 2, completion + 1, (rows,), generator=g)
    width = prompt + int(lengths.max())
    positions = torch.arange(width).unsqueeze(0)
    attn = positions < (prompt + lengths).unsqueeze(1)
    loss = attn & (positions >= prompt)
    ids = torch.randint(1, vocab, (rows, width), generator=g) * attn
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    group_ids = torch.arange(rows) // group
    batch = RolloutBatch(input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=torch.zeros(rows, width),
                         prompt_lengths=torch.full((rows,), prompt), group_ids=group_ids, policy_version=0,
                         finish_reasons=["stop"] * rows, prompt_texts=[""] * rows, completion_texts=[""] * rows,
                         sample_meta=[{}] * rows).validate()
    return batch.with_rewards(rewards).with_advantages(grpo(rewards, group_ids, GRPOAdvantage()))


def bench(model_name: str, args: argparse.Namespace) -> dict:
    from rl.config.algorithm import AlgorithmConfig
    from rl.config.job import TrainerConfig
    from rl.models import load_causal_lm, resolve_model
    from trainers.policy import PolicyTrainer

    model = load_causal_lm(resolve_model(model_name))
    cfg = TrainerConfig(lr=1e-6, max_steps=args.steps + 1, micro_batch_tokens=args.micro_batch_tokens,
                        logprob_chunk_tokens=args.chunk_tokens, gradient_checkpointing=args.gradient_checkpointing)
    trainer = PolicyTrainer(model, AlgorithmConfig(correction={"level": "none"}), cfg, temperature=1.0, device="cpu")
    batch = synthetic_batch(args.rows, args.prompt, args.completion, args.group, model.config.vocab_size)
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        metrics = trainer.step(batch)
        times.append(time.perf_counter() - start)
    timed = times[1:]
    return {"benchmark": "learner_step", "model": model_name, "rows": args.rows, "prompt_tokens": args.prompt,
            "max_completion_tokens": args.completion, "loss_tokens": int(batch.loss_mask.sum()),
            "micro_batch_tokens": args.micro_batch_tokens, "logprob_chunk_tokens": args.chunk_tokens,
            "gradient_checkpointing": args.gradient_checkpointing, "threads": torch.get_num_threads(),
            "step_s_mean": round(statistics.mean(timed), 4), "step_s_min": round(min(timed), 4),
            "loss_tokens_per_s": round(int(batch.loss_mask.sum()) / statistics.mean(timed), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m-instruct"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(bench(name, args))
        print(json.dumps(rows[-1]), flush=True)
    emit({"benchmark": "learner", "args": vars(args), "results": rows}, args.out)


if __name__ == "__main__":
    main()
