"""Child script for benchmarks/vs_trl.py: Hugging Face TRL's GRPOTrainer on the same work.

Runs inside TRL's own virtual environment (TRL is not an rlpost dependency). Reads the prompts and
settings written by vs_trl.py, trains, and writes per-step seconds and rewards as JSON.
"""

import json
import re
import sys
import time

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number_reward(completions, answer, **kwargs):
    """1.0 when the completion's last number equals the answer (the same rule as rlpost's last_number)."""
    out = []
    for text, ans in zip(completions, answer):
        found = NUMBER.findall(text.replace(",", ""))
        out.append(1.0 if found and float(found[-1]) == float(ans) else 0.0)
    return out


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.rewards, self._t = [], [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            self.rewards.append(logs["reward"])


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="float32")
    data = Dataset.from_list([{"prompt": p["text"], "answer": p["answer"]} for p in spec["prompts"]])
    cfg = GRPOConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        per_device_train_batch_size=spec["prompts_per_step"] * spec["group_size"],
        num_generations=spec["group_size"], max_completion_length=spec["max_new_tokens"], temperature=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", seed=spec["seed"], gradient_checkpointing=False,
        max_grad_norm=1.0, warmup_steps=0, weight_decay=0.0, shuffle_dataset=True, bf16=False,
    )
    peft_cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=last_number_reward, args=cfg, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_cfg, callbacks=[timer])
    trainer.train()
    json.dump({"step_s": timer.times, "reward": timer.rewards}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
