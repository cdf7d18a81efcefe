"""Child script for benchmarks/perf/vs_trl.py: Hugging Face TRL's GRPOTrainer on the same work.

Runs inside TRL's own virtual environment (TRL is not an rlpost dependency), as a file, not a module: it imports
nothing from rlpost. Reads the spec vs_trl.py writes (its one `Settings`, the rendered prompts, the model
directory), builds GRPOConfig and LoraConfig from those settings and nothing else, and either

    python _trl_grpo.py check SPEC OUT    # writes the effective settings read back from the built trainer
    python _trl_grpo.py train SPEC OUT    # the same, then trains; adds per-step seconds, rewards and tokens

The effective settings use vs_trl.py's names and conventions, so that it can compare them field by field
with rlpost's resolved job before it times anything.
"""

import json
import os
import re
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# rlpost's aggregation name -> TRL's loss_type with the same normalisation (token_mean: by the batch's tokens)
LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "constant": "dr_grpo"}
AGGREGATION = {v: k for k, v in LOSS_TYPE.items()}


class Counter:
    """Generated tokens per optimizer step, counted from the completion ids TRL hands the reward function."""

    def __init__(self):
        self.tokens, self.samples = [], []

    def new_step(self):
        self.tokens.append(0)
        self.samples.append(0)


COUNTER = Counter()


def last_number_reward(completions, answer, completion_ids=None, **kwargs):
    """1.0 when the completion's last number equals the answer (the same rule as rlpost's last_number)."""
    if completion_ids is not None and COUNTER.tokens:
        COUNTER.tokens[-1] += sum(len(ids) for ids in completion_ids)
        COUNTER.samples[-1] += len(completion_ids)
    out = []
    for text, ans in zip(completions, answer):
        found = NUMBER.findall(text.replace(",", ""))
        out.append(1.0 if found and float(found[-1]) == float(ans) else 0.0)
    return out


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.rewards, self._t = [], [], None

    def on_step_begin(self, args, state, control, **kw):
        COUNTER.new_step()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            self.rewards.append(logs["reward"])


def grpo_config(s, out_dir):
    """TRL's config from the shared settings `s`: one optimizer step per generation of
    prompts_per_step x group_size completions, as rlpost's step."""
    batch = s["prompts_per_step"] * s["group_size"]
    return GRPOConfig(
        output_dir=out_dir, max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type=s["lr_schedule"],
        warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"], adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1], max_grad_norm=s["max_grad_norm"],
        per_device_train_batch_size=batch, gradient_accumulation_steps=s["mini_batches"],
        num_generations=s["group_size"], num_iterations=s["ppo_epochs"], max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or 0,  # TRL: 0 = no top-k
        beta=s["kl_coef"], epsilon=s["clip_low"], epsilon_high=s["clip_high"],
        loss_type=LOSS_TYPE[s["aggregation"]], scale_rewards={"group": "group", "batch": "batch"}[s["std_scope"]],
        mask_truncated_completions=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        seed=s["seed"], gradient_checkpointing=False, shuffle_dataset=True, bf16=s["dtype"] == "bfloat16",
    )


def effective(trainer, model, peft_cfg, s):
    """The settings as the built trainer will use them, in vs_trl.py's names (what it compares)."""
    a, g = trainer.args, trainer.generation_config
    per_step = a.generation_batch_size // a.num_generations
    return {
        "model_dir": s["model_dir"], "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "group_size": a.num_generations, "prompts_per_step": per_step, "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k or None, "do_sample": g.do_sample,
        "lr": a.learning_rate, "lr_schedule": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
        "warmup_steps": a.warmup_steps, "weight_decay": a.weight_decay, "betas": [a.adam_beta1, a.adam_beta2],
        "max_grad_norm": a.max_grad_norm, "ppo_epochs": a.num_iterations,
        "mini_batches": a.steps_per_generation, "steps": a.max_steps, "seed": a.seed,
        "lora_r": peft_cfg.r, "lora_alpha": float(peft_cfg.lora_alpha), "lora_dropout": peft_cfg.lora_dropout,
        "target_modules": sorted(peft_cfg.target_modules), "clip_low": a.epsilon, "clip_high": a.epsilon_high,
        "aggregation": AGGREGATION[a.loss_type], "std_scope": a.scale_rewards, "kl_coef": a.beta,
        "trained_tokens": "all completion tokens" if not a.mask_truncated_completions else "untruncated only",
        "threads": torch.get_num_threads(), "reward": "last_number",
    }


def build(spec):
    s = spec["settings"]
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=s["dtype"])
    data = Dataset.from_list([{"prompt": p["text"], "answer": p["answer"]} for p in spec["prompts"]])
    peft_cfg = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules=s["target_modules"],
                          lora_dropout=s["lora_dropout"], task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=last_number_reward, args=grpo_config(s, spec["out_dir"]),
                          train_dataset=data, processing_class=tokenizer, peft_config=peft_cfg, callbacks=[timer])
    return trainer, model, peft_cfg, timer


def main(mode, spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    spec["settings"]["model_dir"] = spec["model_dir"]
    trainer, model, peft_cfg, timer = build(spec)
    result = {"effective": effective(trainer, model, peft_cfg, spec["settings"]), "pid": os.getpid()}
    if mode == "train":
        trainer.train()
        # mask_truncated_completions=False: every generated token is in the loss mask, so trained = generated
        result.update(step_s=timer.times, reward=timer.rewards, generated_tokens=COUNTER.tokens[:len(timer.times)],
                      trained_tokens=COUNTER.tokens[:len(timer.times)], samples=COUNTER.samples[:len(timer.times)])
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
