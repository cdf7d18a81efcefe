"""`curriculum:` — which prompts of the candidate pool each step trains on (null: uniform sampling)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rl.config.base import Section


class PCLCurriculum(Section):
    """Prompt Curriculum Learning (Gao et al., arXiv 2510.01135): a value model predicts each prompt's expected
    reward under the current policy; each step keeps the `prompts_per_step` candidates of a
    `pool_factor x prompts_per_step` uniform pool whose prediction is closest to `target`.

    Here the value model is a frozen copy of a causal LM (prompt features, computed once per prompt and cached)
    with a small trainable MLP head, trained on-policy with MSE on the mean group reward of the prompts just
    rolled out (the paper trains a whole LM + head; see envs/curriculum.py)."""

    name: Literal["pcl"] = "pcl"
    pool_factor: int = Field(default=4, ge=1)
    """Candidates drawn per selected prompt (the paper's k); 1 = no selection (uniform), still trains V."""
    target: float = 0.5
    """Predicted reward to aim for (tau); 0.5 maximises p(1-p) for a 0/1 reward."""
    model: str | None = None
    """Backbone of the value model: an alias, directory or hub id; null = the policy's base model (frozen copy)."""
    pooling: Literal["last", "mean"] = "last"
    """Prompt feature: hidden state of the last prompt token, or the mean over prompt tokens."""
    layer: int = -1
    """Hidden layer the features come from (-1: the final, normed one)."""
    hidden: int = Field(default=64, ge=1)
    """Width of the MLP head (features -> hidden -> 1)."""
    lr: float = Field(default=1e-3, gt=0)
    """Adam learning rate of the head."""
    updates_per_step: int = Field(default=8, ge=1)
    """Full-batch Adam steps on each step's (prompt, mean reward) pairs."""
    squash: Literal["sigmoid", "none"] = "sigmoid"
    """`sigmoid` keeps predictions in (0, 1) (0/1 rewards, as in the paper); `none` for other reward scales."""


CurriculumConfig = Annotated[PCLCurriculum, Field(discriminator="name")]
