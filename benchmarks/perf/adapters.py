"""Learner-step time and peak memory: full fine-tuning vs LoRA, Bone, RoSA, PaCA (ADAPTERS.md §8.6, issue 7).

Step time is the fastest timed step of a run (robust to other processes sharing the CPU; the median is also kept).
`--repeats N` runs every method N times, in alternating order (A B C, C B A, ...), and reports the median and
range over the repeats of each method's s/step and memory ratio to LoRA measured in the same repeat.
One step = forward + backward of a causal-LM loss on a fixed batch + AdamW step, on the same model and batch.
Adapters target all 7 projections at comparable trainable-parameter counts: LoRA r, Bone 2r, PaCA 2r
(r·m vs r(n+m): equal on square weights), RoSA r/2 plus the density that fills the rest of LoRA's budget.
Each method runs in its own subprocess so peak memory is its own: CUDA `max_memory_allocated`, or on CPU
the growth of the process's peak RSS over the loaded model (an upper-bound-ish figure, allocator included).

    python -m benchmarks.perf.adapters --model smollm2-135m-instruct --repeats 3 \\
        --out benchmarks/results/adapters/smollm2_cpu_repeats3.json
    python -m benchmarks.perf.adapters --model tiny-llama --methods lora,paca --steps 1 --warmup 0 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks._report import REPO, abba, child_env, emit, self_command, spread

METHODS = ["full", "lora", "bone", "rosa", "paca", "paca_fused"]  # paca_fused: PaCA's one-GEMM forward (mode: fused)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_config(method: str, r: int, model: torch.nn.Module) -> Any:
    """The project config for `method` at LoRA-r-comparable size (None = full fine-tuning)."""
    from rl.config.adapters import BoneAdapter, LoRAAdapter, PaCAAdapter, RoSAAdapter

    linears = [m for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS]
    lora_budget = sum(r * (m.in_features + m.out_features) for m in linears)
    rosa_lora = sum((r // 2) * (m.in_features + m.out_features) for m in linears)
    density = (lora_budget - rosa_lora) / sum(m.in_features * m.out_features for m in linears)
    return {"full": None,
            "lora": LoRAAdapter(r=r, alpha=2 * r, target_modules=PROJECTIONS),
            "bone": BoneAdapter(r=2 * r, target_modules=PROJECTIONS),
            "rosa": RoSAAdapter(r=r // 2, alpha=r, density=density, target_modules=PROJECTIONS),
            "paca": PaCAAdapter(r=2 * r, alpha=4 * r, target_modules=PROJECTIONS),
            "paca_fused": PaCAAdapter(r=2 * r, alpha=4 * r, target_modules=PROJECTIONS, mode="fused")}[method]


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` learner steps of `method` after `args.warmup` untimed ones."""
    from rl.models import load_causal_lm, resolve_model
    from trainers.adapters import apply_adapter
    from trainers.adapters.rosa import RosaLayer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = load_causal_lm(resolve_model(args.model), args.dtype, device)
    cfg = adapter_config(method, args.r, model)
    model = apply_adapter(model, cfg)
    for layer in model.modules():  # the mask schedule is not a per-step cost: give RoSA a (random) mask now
        if isinstance(layer, RosaLayer):
            nnz = layer.rosa_spa_values["default"].numel()
            layer.set_mask("default", torch.randperm(layer.in_features * layer.out_features, device=device)[:nnz])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and args.dtype != "float32")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_peak = peak_bytes(device)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = peak_bytes(device)
    return {"method": method, "device": device, "trainable_params": sum(p.numel() for p in params),
            "step_s": min(times), "step_median_s": statistics.median(times), "peak_mib": peak / 2**20,
            "peak_over_model_mib": (peak - (0 if device == "cuda" else base_peak)) / 2**20,
            "config": None if cfg is None else cfg.model_dump()}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method: the first repeat's row plus, over the repeats, the median and range of its s/step and peak
    memory and of their ratios to LoRA in the same repeat (a ratio quoted in README is that median and range)."""
    lora = runs.get("lora")
    rows = []
    for reps in runs.values():
        row = {**reps[0], "repeats": reps, "step_s": spread([r["step_s"] for r in reps])["median"],
               "step_s_spread": spread([r["step_s"] for r in reps]),
               "peak_over_model_mib": spread([r["peak_over_model_mib"] for r in reps])["median"]}
        if lora:
            row["step_s_vs_lora"] = spread([r["step_s"] / base["step_s"] for r, base in zip(reps, lora)])
            row["peak_vs_lora"] = spread([r["peak_over_model_mib"] / base["peak_over_model_mib"]
                                          for r, base in zip(reps, lora) if base["peak_over_model_mib"]]
                                         or [float("nan")])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Medians over the repeats; `x LoRA` is the median of the per-repeat ratios, with its range."""
    def ratio(r: dict[str, Any], key: str) -> str:
        s = r.get(key)
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]" if s else "-"
    lines = [f"{'method':10} {'trainable':>12} {'step_s':>9} {'x LoRA [range]':>18} {'peak MiB':>9} "
             f"{'x LoRA [range]':>18}"]
    for r in rows:
        lines.append(f"{r['method']:10} {r['trainable_params']:>12,} {r['step_s']:>9.4f} "
                     f"{ratio(r, 'step_s_vs_lora'):>18} "
                     f"{r['peak_over_model_mib']:>9.1f} {ratio(r, 'peak_vs_lora'):>18}")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama", help="alias, hub id or local directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--r", type=int, default=8, help="LoRA rank; the others are sized to match it")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over the methods, in alternating order (A B .., .. B A); ratios: median and range")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    return p.parse_args()


def run_child(method: str) -> dict[str, Any]:
    """`method` in its own process, so that its peak memory is its own."""
    done = subprocess.run(self_command(__spec__.name, *sys.argv[1:], "--one", method), capture_output=True,
                          text=True, check=False, cwd=REPO, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    methods = args.methods.split(",")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    order = abba(methods, args.repeats)
    for method in order:
        runs[method].append(run_child(method))
    rows = summarise(runs)
    print(table(rows))
    emit({"benchmark": "adapters", "args": {k: v for k, v in vars(args).items() if k != "one"}, "order": order,
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
