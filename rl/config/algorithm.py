"""`algorithm:` — advantages, the per-token objective, its aggregation, KL and mismatch correction.

Each variant is selected by its `name`; its fields belong to it alone (ALGORITHMS.md has the maths).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from rl.config.base import CustomSection, Section
from rl.registry import CUSTOM


class GRPOAdvantage(Section):
    """GRPO: (R - group mean) / (group std + eps) (DeepSeekMath, arXiv 2402.03300)."""

    name: Literal["grpo"] = "grpo"
    eps: float = Field(default=1e-6, gt=0)
    """Added to the standard deviation before dividing (verl's value)."""
    std_scope: Literal["group", "batch"] = "group"
    """Divide by the group's std (GRPO) or by the whole batch's std (more robust for small groups)."""


class DrGRPOAdvantage(Section):
    """Dr.GRPO: R - group mean, no std division (arXiv 2503.20783)."""

    name: Literal["dr_grpo"] = "dr_grpo"


class RLOOAdvantage(Section):
    """RLOO: R_i minus the mean of the other G-1 rewards of its group (arXiv 2402.14740)."""

    name: Literal["rloo"] = "rloo"


class CustomAdvantage(CustomSection):
    """Your own advantage: `fn(rewards [N], group_ids [N], cfg) -> advantages [N]` named by `import_path` (rows
    of a group are contiguous; `cfg` is this section, your settings in `cfg.kwargs`). Checked at validation."""

    registry_name = "ADVANTAGES"


AdvantageConfig = Annotated[GRPOAdvantage | DrGRPOAdvantage | RLOOAdvantage | CustomAdvantage,
                            Field(discriminator="name")]


class LossSection(Section):
    """What the job asks of every loss section besides its own fields."""

    @property
    def corrects_sampler_mismatch(self) -> bool:
        """True when the objective's own importance weight already corrects the sampler/learner mismatch, so
        `correction.level: auto` resolves to none and an explicit token/sequence level is an error."""
        return False


class PPOClipLoss(LossSection):
    """GRPO's per-token clipped surrogate with DAPO's separate low/high clip ranges."""

    name: Literal["ppo_clip"] = "ppo_clip"
    clip_low: float = Field(default=0.2, ge=0, le=1)
    """Lower clip: ratios below 1 - clip_low stop contributing gradient for negative advantages."""
    clip_high: float = Field(default=0.28, ge=0)
    """Upper clip: ratios above 1 + clip_high stop contributing gradient for positive advantages."""


class GSPOLoss(LossSection):
    """GSPO: sequence-level length-normalised ratio with sequence-level clipping (arXiv 2507.18071)."""

    name: Literal["gspo"] = "gspo"
    clip_low: float = Field(default=3e-4, ge=0, le=1)
    clip_high: float = Field(default=4e-4, ge=0)


class GSPOTokenLoss(LossSection):
    """GSPO-token: the sequence ratio with per-token advantages (equals GSPO for constant advantages)."""

    name: Literal["gspo_token"] = "gspo_token"
    clip_low: float = Field(default=3e-4, ge=0, le=1)
    clip_high: float = Field(default=4e-4, ge=0)


class ReinforceLoss(LossSection):
    """Plain policy gradient, -A * log pi (ratio fixed at 1)."""

    name: Literal["reinforce"] = "reinforce"


class LpRegLoss(LossSection):
    """Lp-Reg (arXiv 2510.03222): the clipped surrogate, plus a k3 pull toward a min-p-filtered proxy of the old
    policy on the lowest-probability negative-advantage tokens. Defaults: the released scripts (Qwen3-14B)."""

    name: Literal["lp_reg"] = "lp_reg"
    clip_low: float = Field(default=1.0, ge=0, le=1)
    """Lower clip of the surrogate (released scripts: 1.0, i.e. ratios clipped to [0, 10] with clip_high 9)."""
    clip_high: float = Field(default=9.0, ge=0)
    proxy: Literal["min_p", "fixed"] = "min_p"
    """Which tokens the proxy drops as noise: p < min_p * max p (`min_p`) or p < fixed_threshold (`fixed`)."""
    min_p: float = Field(default=0.02, gt=0, lt=1)
    """kappa, relative to the most probable token (released scripts: 0.02)."""
    fixed_threshold: float = Field(default=0.01, gt=0, lt=1)
    """tau, an absolute probability; used with proxy: fixed."""
    soft_filter: bool = False
    """Filtered logits set to the row's smallest logit instead of -1e4 (the reference's `minp_soft`)."""
    neg_fraction: float = Field(default=0.01, ge=0, le=1)
    """rho: the fraction of negative-advantage tokens (lowest current probability) eligible per micro-batch;
    none are when int(count * rho) <= 1 (released: 0.01 for Qwen3-14B, 0.005 for Qwen2.5-32B)."""
    pos_fraction: float = Field(default=0.0, ge=0, le=1)
    """The same for positive-advantage tokens (0 in the released scripts)."""
    coef: float = Field(default=1.0, ge=0)
    """beta, the weight of the k3 term (released: 1.0)."""


class RapidLoss(LossSection):
    """RAPID (arXiv 2510.03515): policy gradient with an importance-weighted group baseline and clipped
    sequence weights pi/pi_b, for several mini-batch updates per large inference batch (set
    trainer.mini_batches). It computes its own advantage from rewards: algorithm.advantage is not used."""

    name: Literal["rapid"] = "rapid"
    eta: float = Field(default=2.0, gt=0)
    """Importance weights are clipped at this value (the paper's 2.0)."""
    baseline: Literal["leave_one_out", "weighted_mean", "self_normalised"] = "leave_one_out"
    """Group value estimate from the other members, (1/(G-1)) sum_{j != i} w_j R_j (unbiased before clipping,
    the paper's claim); or (1/G) sum w R; or sum w R / sum w (both hold the sample's own term)."""
    scale_by_std: bool = False
    """Divide advantages by the group's reward std (GRPO-style); the paper's GRPG does not."""
    eps: float = Field(default=1e-6, gt=0)
    behaviour_logprobs: Literal["learner", "sampler"] = "learner"
    """pi_b: recomputed by the learner once per step before any update, or the sampler's own log-probs
    (saves a forward pass; exact with the hf backend, which samples with the learner's model). With `sampler`
    the weight pi / pi_sampler already corrects the sampler mismatch: `correction.level` must be none (auto)."""

    @property
    def corrects_sampler_mismatch(self) -> bool:
        """True when the sequence weight is taken against the sampler's own log-probs."""
        return self.behaviour_logprobs == "sampler"


class CustomLoss(CustomSection, LossSection):
    """Your own per-token loss named by `import_path`: a plain `fn(logp, old_logp, adv, mask, cfg) -> (loss [B, T],
    stats)` (trainers/losses.py has the shapes), or an `rl.types.Objective` for one that needs extra inputs
    (`prepare`), whole groups per micro-batch or no recomputed old log-probs. `cfg` is this section, your
    settings in `cfg.kwargs`. Checked at validation. No paper prescribes its aggregation (token_mean unless
    set), and the sampler mismatch is corrected as for the built-ins (`correction.level: auto`)."""

    registry_name = "LOSSES"


LossConfig = Annotated[PPOClipLoss | GSPOLoss | GSPOTokenLoss | ReinforceLoss | LpRegLoss | RapidLoss | CustomLoss,
                       Field(discriminator="name")]


class TokenMean(Section):
    """Sum of masked token losses / number of masked tokens in the whole batch (DAPO, verl default)."""

    name: Literal["token_mean"] = "token_mean"


class SeqMeanTokenMean(Section):
    """Mean over sequences of each sequence's token mean (original GRPO; GSPO)."""

    name: Literal["seq_mean_token_mean"] = "seq_mean_token_mean"


class SeqMeanTokenSum(Section):
    """Mean over sequences of each sequence's token sum."""

    name: Literal["seq_mean_token_sum"] = "seq_mean_token_sum"


class ConstantNorm(Section):
    """Dr.GRPO: sum of masked token losses / (number of sequences x a constant length)."""

    name: Literal["constant"] = "constant"
    max_length: int | None = Field(default=None, gt=0)
    """The constant; null uses rollout.max_new_tokens."""


AggregationSection = TokenMean | SeqMeanTokenMean | SeqMeanTokenSum | ConstantNorm
AggregationConfig = Annotated[AggregationSection, Field(discriminator="name")]


class KLConfig(Section):
    """KL penalty to the reference policy, added to the per-token loss."""

    coef: float = Field(default=0.0, ge=0)
    """Coefficient beta; 0 disables the term and loads no reference policy."""
    estimator: Literal["k1", "k3"] = "k3"
    """k1 = log(pi/pi_ref); k3 = pi_ref/pi - log(pi_ref/pi) - 1 (DeepSeekMath, clamped to [-10, 10])."""


class MismatchCorrection(Section):
    """Truncated importance weights pi_learner_old / pi_sampler for sampler/learner mismatch."""

    level: Literal["none", "token", "sequence", "auto"] = "auto"
    """`auto` is resolved when the job is validated (the resolved level is in RUN_DIR/config.yaml): `token`
    whenever the sampler's weights or kernels can differ from the learner's (trainer.mode: async, cluster: ray,
    rollout.backend: vllm), `none` when the local transformers engine samples with the learner's own model
    (and for rapid with behaviour_logprobs: sampler, whose own weight is the correction)."""
    cap: float = Field(default=2.0, gt=0)
    """Weights are truncated at this value (TIS)."""


def resolve_correction_level(level: str, sampler_is_learner: bool, loss: LossSection) -> str:
    """The effective level of `correction.level` (see MismatchCorrection.level); explicit levels stay."""
    if level != "auto":
        return level
    if sampler_is_learner or loss.corrects_sampler_mismatch:
        return "none"
    return "token"


def _check_single_correction(loss: LossSection | None, correction: MismatchCorrection) -> None:
    if loss is not None and loss.corrects_sampler_mismatch and correction.level in ("token", "sequence"):
        raise ValueError(
            f"level {correction.level!r} with loss rapid and behaviour_logprobs: sampler would "
            "apply the sampler importance weight twice (RAPID's sequence weight is already pi / pi_sampler); set "
            "algorithm.correction.level: auto (or none), or use behaviour_logprobs: learner to keep TIS")


# The aggregation each paper's objective is defined with; the loss decides before the advantage (GSPO's
# objective is a mean over sequences of a per-sequence term whatever the advantage; Dr.GRPO's constant
# normaliser replaces the per-token mean of the losses that have one).
PAPER_AGGREGATION_BY_LOSS = {"gspo": "seq_mean_token_mean", "gspo_token": "seq_mean_token_mean"}
PAPER_AGGREGATION_BY_ADVANTAGE = {"dr_grpo": "constant"}
LOSSES_WITHOUT_ADVANTAGE = ("rapid",)  # computes its own advantage: algorithm.advantage prescribes nothing


def paper_aggregation(loss: str, advantage: str) -> str | None:
    """The aggregation the (loss, advantage) pair's paper uses, or None when it leaves the choice open (always
    for a custom loss: its author chooses; a custom advantage with a built-in loss follows the loss)."""
    if loss == CUSTOM:
        return None
    if loss in PAPER_AGGREGATION_BY_LOSS:
        return PAPER_AGGREGATION_BY_LOSS[loss]
    return None if loss in LOSSES_WITHOUT_ADVANTAGE else PAPER_AGGREGATION_BY_ADVANTAGE.get(advantage)


def _variant_name(value: object, default: str) -> str:
    """The `name` of a section given as a dict, a model, or left out (its default variant)."""
    if isinstance(value, dict):
        return str(value.get("name", default))
    return str(value.model_dump(include={"name"}).get("name", default)) if isinstance(value, Section) else default


class AlgorithmConfig(Section):
    """The learning algorithm."""

    name: Literal["grpo"] = "grpo"
    """The training recipe; `grpo` covers the GRPO family (GSPO, Dr.GRPO, DAPO) through the keys below."""
    advantage: AdvantageConfig = Field(default_factory=GRPOAdvantage)
    """`name`: grpo, dr_grpo or rloo, or `custom` with `import_path` (and `kwargs`) for your own function."""
    loss: LossConfig = Field(default_factory=PPOClipLoss)
    """`name`: ppo_clip, gspo, gspo_token, reinforce, lp_reg or rapid, or `custom` with `import_path` (and
    `kwargs`) for your own loss (a function or an rl.types.Objective; see CustomLoss)."""
    allow_nonstandard_aggregation: bool = False
    """Accept an explicit aggregation that differs from the paper's for this loss/advantage (e.g. gspo with
    token_mean, which weights each sequence by its length); otherwise such a pair is an error."""
    aggregation: AggregationConfig = Field(default_factory=TokenMean)
    """Left out, it follows the paper of the loss/advantage: `seq_mean_token_mean` for gspo and gspo_token,
    `constant` (C = rollout.max_new_tokens) for dr_grpo, `token_mean` otherwise (and for a custom loss)."""
    kl: KLConfig = Field(default_factory=KLConfig)
    correction: MismatchCorrection = Field(default_factory=MismatchCorrection)

    @model_validator(mode="before")
    @classmethod
    def _paper_aggregation_by_default(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("aggregation") is not None:
            return data
        loss, advantage = _variant_name(data.get("loss"), "ppo_clip"), _variant_name(data.get("advantage"), "grpo")
        name = paper_aggregation(loss, advantage)
        return {**data, "aggregation": {"name": name or "token_mean"}}

    # Field validators (the fields above are validated first, in order) so errors carry the key's path.
    @field_validator("aggregation")
    @classmethod
    def _paper_aggregation_or_opt_in(cls, aggregation: AggregationSection, info: ValidationInfo) -> AggregationSection:
        loss, advantage = info.data.get("loss"), info.data.get("advantage")
        if loss is None or advantage is None or info.data.get("allow_nonstandard_aggregation"):
            return aggregation  # (a bad loss or advantage is reported on its own)
        paper = paper_aggregation(loss.name, advantage.name)
        if paper is not None and aggregation.name != paper:
            raise ValueError(
                f"{aggregation.name!r} is not the aggregation of loss {loss.name!r} with advantage {advantage.name!r}, "
                f"whose paper uses {paper!r}; set algorithm.aggregation: {{name: {paper}}} (or leave it out: it "
                "defaults to that), or set algorithm.allow_nonstandard_aggregation: true to keep it")
        return aggregation

    @field_validator("correction")
    @classmethod
    def _single_correction(cls, correction: MismatchCorrection, info: ValidationInfo) -> MismatchCorrection:
        _check_single_correction(info.data.get("loss"), correction)
        return correction


class GRPOMAAlgorithm(Section):
    """GRPO-MA (Wang et al., arXiv 2509.24494): K thoughts per prompt, M answers per thought.

    Thought advantages come from the mean reward of each thought's M answers, normalised over the prompt's
    K thoughts; answers get their own advantages (trainers/grpo_ma.py has the formulas). The segment means
    of the paper's objective are folded into per-token advantages, so the aggregation must be
    `seq_mean_token_sum` and the loss one that is linear in the advantage per token (ppo_clip, reinforce).
    """

    name: Literal["grpo_ma"] = "grpo_ma"
    thoughts: int = Field(default=4, ge=1)
    """K: thoughts sampled per prompt (rollout.group_size is not used; a prompt yields K x M rows)."""
    answers_per_thought: int = Field(default=4, ge=1)
    """M: answers sampled per thought, each continuing the prompt + thought tokens."""
    thought_delimiter: str = Field(default="Answer:", min_length=1)
    """The thought ends at (and includes) this text; a thought that never writes it gets reward 0 answers."""
    answer_max_new_tokens: int = Field(default=16, ge=1)
    """Token budget of each answer (rollout.max_new_tokens is the thought's budget)."""
    answer_adv_scope: Literal["global", "per_thought"] = "global"
    """Normalise answer rewards over all K x M answers of the prompt (`global`), or within each
    thought's M answers (`per_thought`: which answer is better given this thought)."""
    eps: float = Field(default=1e-6, gt=0)
    """Added to standard deviations before dividing."""
    loss: LossConfig = Field(default_factory=PPOClipLoss)
    """ppo_clip or reinforce: the losses that are per-token and positively homogeneous in the advantage (a custom
    loss is not accepted: the folding of segment means into advantages is exact only for those)."""
    aggregation: AggregationConfig = Field(default_factory=SeqMeanTokenSum)
    kl: KLConfig = Field(default_factory=KLConfig)
    correction: MismatchCorrection = Field(default_factory=MismatchCorrection)

    @model_validator(mode="after")
    def _segment_weights_need(self) -> GRPOMAAlgorithm:
        if self.aggregation.name != "seq_mean_token_sum":
            raise ValueError("grpo_ma folds the paper's per-segment token means into its per-token advantages; "
                             "set algorithm.aggregation: {name: seq_mean_token_sum} (the default)")
        if self.loss.name not in ("ppo_clip", "reinforce"):
            raise ValueError(f"grpo_ma needs a per-token loss (ppo_clip or reinforce), not {self.loss.name!r}: "
                             "sequence-level losses would mix the thought and answer advantages")
        return self


def _algorithm_name(value: object) -> str:
    """`name` selects the variant; a job that leaves it out means the GRPO family (the default)."""
    return _variant_name(value, "grpo")


AnyAlgorithmConfig = Annotated[Annotated[AlgorithmConfig, Tag("grpo")] | Annotated[GRPOMAAlgorithm, Tag("grpo_ma")],
                               Discriminator(_algorithm_name)]
