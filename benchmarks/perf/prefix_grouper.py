"""Prefix Grouper: forward + backward time and peak memory, grouped vs padded (ALGORITHMS.md §4).

One group = one prompt of P tokens and G completions of C tokens. `padded` is the per-sample forward
(G rows [P; R_i], trainers/logprobs.py); `grouped` packs the group into one row [P; R_1; ...; R_G]
(trainers/prefix_grouper.py). Both compute the completion tokens' logprobs (LM head on completion
positions only, chunked) and backpropagate sum_i A_i mean_t logp_it into all weights (full fine-tuning,
fp32). Time is the fastest of the timed repetitions and `--rounds` (robust to other processes on a shared
CPU); each layout runs in its own subprocess, so peak memory is its own: CUDA `max_memory_allocated`, or on CPU the
growth of peak RSS over the built model.

The theoretical FLOP ratio is padded / grouped forward FLOPs of the two layouts (backward is ~2x forward
in both, so fwd+bwd has the same ratio): projections + MLP on G(P+C) vs P+GC tokens, causal attention on
G(P+C)^2/2 vs P^2/2 + G(PC + C^2/2) query-key pairs (the paper's two-call attention; the masked call
used here also spends the off-diagonal completion blocks), the LM head on GC tokens in both.

    python -m benchmarks.perf.prefix_grouper                          # SmolLM2-135M shape, the full grid
    # the saved CPU figure (2-CPU host shared with other jobs: 1 thread, CPU-time clock); *_6layers.json
    # and *_12layers.json add --layers 6 / --layers 12
    python -m benchmarks.perf.prefix_grouper --prompts 1024 --groups 8 --threads 1 --clock cpu \
        --warmup 0 --steps 1 --out benchmarks/results/prefix_grouper/cpu.json
    python -m benchmarks.perf.prefix_grouper --quick                  # tiny-llama shape, small grid: a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks._report import REPO, child_env, emit, self_command

# Shapes built in code with random weights (timing does not depend on the values; nothing to download).
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def build_model(name: str, device: str, layers: int | None = None) -> Any:
    """A random model of a named shape (optionally with fewer layers), or a real one (alias, directory, hub id)."""
    if name not in SHAPES:
        from rl.models import load_causal_lm, resolve_model

        return load_causal_lm(resolve_model(name), "float32", device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {**SHAPES[name], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(max_position_embeddings=8192, attn_implementation="sdpa", **shape)
    return LlamaForCausalLM(config).to(device)


def forward_flops(config: Any, prompt: int, group: int, completion: int, layout: str) -> float:
    """Forward FLOPs (2 per multiply-add) of one group in `layout` (see the module docstring)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_token = 2 * (h * (2 * h + 2 * kv) + 3 * h * config.intermediate_size)  # q, o, k, v + gated MLP
    per_pair = 2 * 2 * h  # q.k and p.v over all heads
    if layout == "padded":
        tokens, pairs = group * (prompt + completion), group * (prompt + completion) ** 2 / 2
    else:
        tokens = prompt + group * completion
        pairs = prompt ** 2 / 2 + group * (prompt * completion + completion ** 2 / 2)
    head = 2 * h * config.vocab_size * group * completion
    return layers * (tokens * per_token + pairs * per_pair) + head


def group_batch(prompt: int, group: int, completion: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """One group, right-padded rows [prompt][completion], random tokens and advantages."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1, vocab, (prompt,), generator=g)
    ids = torch.cat([prompt_ids.expand(group, prompt), torch.randint(1, vocab, (group, completion), generator=g)], 1)
    attn = torch.ones_like(ids, dtype=torch.bool)
    loss = attn.clone()
    loss[:, :prompt] = False
    adv = torch.randn(group, generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attn, loss_mask=loss, advantages=adv,
                                             prompt_lengths=torch.full((group,), prompt),
                                             group_ids=torch.zeros(group, dtype=torch.long)).items()}


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(layout: str, prompt: int, group: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` forward+backward passes of one group in `layout` after `args.warmup` untimed ones."""
    from trainers.logprobs import token_logprobs
    from trainers.prefix_grouper import shared_prefix_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, device, args.layers).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = group_batch(prompt, group, args.completion, model.config.vocab_size, device)
    weights = (b["advantages"] / args.completion).unsqueeze(1)  # [G, 1]: sum_i A_i mean_t logp_it
    common = (model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    extra = (b["prompt_lengths"], b["group_ids"]) if layout == "grouped" else ()
    compute = shared_prefix_logprobs if layout == "grouped" else token_logprobs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_peak = peak_bytes(device)
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        logp, _ = compute(*common, *extra, chunk_tokens=args.chunk_tokens)
        (logp * weights).sum().backward()
        model.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = peak_bytes(device)
    return {"layout": layout, "prompt": prompt, "group": group, "completion": args.completion, "device": device,
            "threads": torch.get_num_threads(), "clock": args.clock,
            "layers": model.config.num_hidden_layers, "wall_s": min(times), "cpu_s": min(cpu_times),
            "step_s": min(cpu_times if args.clock == "cpu" else times), "wall_s_all": [round(t, 3) for t in times],
            "peak_mib": peak / 2**20, "peak_over_model_mib": (peak - (0 if device == "cuda" else base_peak)) / 2**20,
            "forward_gflop": forward_flops(model.config, prompt, group, args.completion, layout) / 1e9}


def subprocess_run(layout: str, prompt: int, group: int) -> dict[str, Any]:
    cmd = self_command(__spec__.name, "--one", f"{layout},{prompt},{group}", *sys.argv[1:])
    # This checkout's packages first, whatever is installed (a worktree beside an editable install).
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=child_env(), cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{layout} P={prompt} G={group} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the fastest step; its peak memory is the largest seen (peaks do not depend on load)."""
    best = dict(min(runs, key=lambda r: r["step_s"]))
    best["peak_over_model_mib"] = max(r["peak_over_model_mib"] for r in runs)
    return best


def compare(padded: dict[str, Any], grouped: dict[str, Any]) -> dict[str, Any]:
    speedup = padded["step_s"] / grouped["step_s"]
    flop_ratio = padded["forward_gflop"] / grouped["forward_gflop"]
    memory = padded["peak_over_model_mib"] / max(grouped["peak_over_model_mib"], 1e-9)
    return {"prompt": padded["prompt"], "group": padded["group"], "completion": padded["completion"],
            "padded_s": padded["step_s"], "grouped_s": grouped["step_s"], "speedup": speedup,
            "flop_ratio": flop_ratio, "speedup_over_flop_ratio": speedup / flop_ratio,
            "padded_peak_mib": padded["peak_over_model_mib"], "grouped_peak_mib": grouped["peak_over_model_mib"],
            "memory_ratio": memory}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'P':>5} {'G':>3} {'padded_s':>9} {'grouped_s':>9} {'speedup':>8} {'FLOP x':>7} {'sp/FLOP':>7} "
             f"{'pad MiB':>8} {'grp MiB':>8}"]
    for r in rows:
        lines.append(f"{r['prompt']:>5} {r['group']:>3} {r['padded_s']:>9.3f} {r['grouped_s']:>9.3f} "
                     f"{r['speedup']:>8.2f} {r['flop_ratio']:>7.2f} {r['speedup_over_flop_ratio']:>7.2f} "
                     f"{r['padded_peak_mib']:>8.0f} {r['grouped_peak_mib']:>8.0f}")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help=f"a random shape ({', '.join(SHAPES)}) or an alias/directory")
    p.add_argument("--layers", type=int, default=None,
                   help="fewer decoder layers than the shape has, for a slow or shared CPU; the LM head (same in "
                        "both layouts) then weighs more, so the FLOP ratio, computed for the layers used, is lower")
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed repetitions (the fastest is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate padded/grouped subprocesses this many times (fastest kept): load drift on a "
                        "shared machine then hits both layouts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time: with --threads 1 on a CPU shared with other "
                        "jobs, CPU time is the compute actually spent and does not count time spent descheduled")

    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="on by default: the padded SmolLM2 layout at P=2048, G=16 needs tens of GiB without it")
    p.add_argument("--quick", action="store_true", help="tiny shape, P in {256, 1024}, G in {4, 8}, 1 timed step")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "layout,prompt,group"
    args = p.parse_args()
    if args.quick:
        args.model, args.prompts, args.groups, args.steps = "tiny", [256, 1024], [4, 8], 1
    return args


def main() -> None:
    args = parse()
    if args.one:
        layout, prompt, group = args.one.split(",")
        print(json.dumps(run_one(layout, int(prompt), int(group), args)))
        return
    raw, rows = [], []
    for prompt in args.prompts:
        for group in args.groups:
            runs = [subprocess_run(layout, prompt, group) for _ in range(args.rounds)
                    for layout in ("padded", "grouped")]
            raw += runs
            pair = [fastest([r for r in runs if r["layout"] == layout]) for layout in ("padded", "grouped")]
            rows.append(compare(*pair))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    emit({"benchmark": "prefix_grouper", "args": {k: v for k, v in vars(args).items() if k != "one"},
          "results": rows, "raw": raw}, args.out)


if __name__ == "__main__":
    main()
