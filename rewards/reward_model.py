"""`name: reward_model`: a learned reward model's score of each completion, batched (rl/reward_model.py).

    rewards:
      - {name: reward_model, path: runs/my_rm/export}

The score is the model's logit for `[user: question, assistant: completion]` in the reward model's own chat
template, the same text and pass `rl train-rm` trained and evaluated it with. Under `cluster: ray` it runs in
its own actor with `resources` (rl/loop/reward_actor.py); here it is in process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rewards import RewardError
from rl.models import load_reward_model, load_tokenizer, reward_model_dir
from rl.registries import REWARD_MODELS
from rl.reward_model import rm_text, score_texts

if TYPE_CHECKING:
    from rl.config.rewards import RewardModelReward


def _device(asked: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if asked == "auto" else asked


@REWARD_MODELS.register("reward_model")
class ModelReward:
    """Loaded once per run; each call scores the batch's completions `batch_size` at a time."""

    placeable = True  # a model of its own: under cluster: ray it gets its own actor and resources

    def __init__(self, cfg: RewardModelReward) -> None:
        device = _device(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        self.cfg = cfg
        self.model = load_reward_model(cfg.path, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(reward_model_dir(cfg.path))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[float | Exception]:
        out: list[float | Exception] = []
        texts: list[str] = []
        for completion, f in zip(completions, fields):
            question = f.get("question")
            if not isinstance(question, str):
                out.append(RewardError("the sample has no `question` field (the user text a reward model scores "
                                       "the completion against); build the env's prompts with envs.base.render_prompt"))
                continue
            out.append(0.0)  # placeholder, filled below in order
            texts.append(rm_text(self.tokenizer, question, completion))
        scores = iter(score_texts(self.model, self.tokenizer, texts, self.cfg.batch_size, self.cfg.max_length))
        return [v if isinstance(v, Exception) else next(scores) for v in out]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]  # free the weights now, not at interpreter exit
