"""The reward model being trained: building it (full or LoRA), one optimizer step, held-out evaluation, export.

Scores go through rl.reward_model (rm_text -> encode -> rewards), the pass the `reward_model` reward uses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from rl.models import load_tokenizer, new_reward_model, resolve_model
from rl.reward_model import encode, rewards, rm_text
from trainers.adapters.core import lora_config
from trainers.reward_model.data import Pair
from trainers.reward_model.objective import bradley_terry_loss, pairwise_accuracy

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rl.config.reward_model_job import RewardModelJob

SCORE_HEAD = "score"  # the sequence-classification head transformers puts on causal LMs (Llama, Qwen, ...)


def build_reward_model(job: RewardModelJob, device: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The backbone with a fresh scalar head (seeded by `train.seed`), LoRA-wrapped when the job asks."""
    model_dir = resolve_model(job.model.path, job.model.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(job.train.seed)  # the head's (and LoRA's) initial weights: same on a resumed run
    model: torch.nn.Module = new_reward_model(model_dir, dtype=job.model.dtype)
    if job.adapter is not None:
        from peft import LoraConfig, get_peft_model

        config = lora_config(job.adapter)  # a fresh config: the policy's LoRA, retargeted to a classifier
        assert isinstance(config, LoraConfig), "the job schema admits only LoRA for reward models"
        config.task_type = "SEQ_CLS"  # PEFT's sequence-classification wrapper
        config.modules_to_save = [SCORE_HEAD]  # the fresh head trains in full, beside the LoRA factors
        model = get_peft_model(model, config)
    return model.to(device), tokenizer


def pair_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair],
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of `pairs`, both sides in one forward pass (with grad when the caller allows)."""
    texts = [rm_text(tokenizer, p.prompt, p.chosen) for p in pairs] + \
        [rm_text(tokenizer, p.prompt, p.rejected) for p in pairs]
    scores = rewards(model, encode(tokenizer, texts, max_length))  # type: ignore[arg-type]  # PeftModel forwards
    return scores[:len(pairs)], scores[len(pairs):]


def train_step(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
               pairs: Sequence[Pair], max_length: int, max_grad_norm: float) -> dict[str, float]:
    """One AdamW step on the Bradley-Terry loss of `pairs`; the step's training metrics."""
    model.train()
    chosen, rejected = pair_scores(model, tokenizer, pairs, max_length)
    loss = bradley_terry_loss(chosen, rejected)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), "train/accuracy": pairwise_accuracy(chosen.detach(), rejected.detach()),
            "train/margin": float((chosen - rejected).detach().mean()), "grad_norm": float(grad_norm)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_length: int,
             batch_size: int) -> dict[str, float]:
    """Held-out pairwise accuracy, Bradley-Terry loss and mean margin over every pair."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, tokenizer, pairs[start:start + batch_size], max_length)
        chosen.append(c)
        rejected.append(r)
    c_all, r_all = torch.cat(chosen), torch.cat(rejected)
    return {"eval/accuracy": pairwise_accuracy(c_all, r_all), "eval/loss": float(bradley_terry_loss(c_all, r_all)),
            "eval/margin": float((c_all - r_all).mean()), "eval/pairs": float(len(pairs))}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trained tensors (all of them in full fine-tuning; LoRA + head with an adapter)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(f"checkpoint weights do not match the model ({sorted(set(params) ^ set(state))[:3]}); "
                         "was the job's model or adapter changed?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def export_reward_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """A plain Hugging Face sequence-classification directory (LoRA merged) with its tokenizer."""
    from trainers.adapters.core import is_adapted

    # merge_and_unload returns the base classifier; unadapted, `model` is new_reward_model's PreTrainedModel
    plain = cast("PreTrainedModel", copy.deepcopy(model).merge_and_unload() if is_adapted(model) else model)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
