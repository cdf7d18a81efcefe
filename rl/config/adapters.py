"""`adapter:` — parameter-efficient fine-tuning (ADAPTERS.md). null in the job = full fine-tuning.

Trainable parameters per adapted linear W ∈ R^{m×n}: LoRA r(n+m); Bone r·m (mini: r·mini_r);
RoSA r(n+m) + int(density·m·n); PaCA r·m. So PaCA at r=2k matches LoRA at r=k when m = n.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rl.config.base import Section

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class _AdapterCommon(Section):
    target_modules: list[str] = Field(default_factory=lambda: list(LINEAR_TARGETS))
    """Linear layers to adapt (module-name suffixes), e.g. add gate_proj, up_proj, down_proj for the MLP."""


class LoRAAdapter(_AdapterCommon):
    """LoRA (PEFT `LoraConfig`): W0 + (alpha/r) B A; served to vLLM as a hot-loaded LoRA."""

    name: Literal["lora"] = "lora"
    r: int = Field(default=16, ge=1)
    """Rank of B A."""
    alpha: float = Field(default=32.0, gt=0)
    """Scaling numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""


class BoneAdapter(_AdapterCommon):
    """Bone / MiSS (PEFT `MissConfig`; PEFT removed BoneConfig): a block shared across the weight's input shards."""

    name: Literal["bone"] = "bone"
    r: int = Field(default=16, ge=1)
    """Shard width (the rank of ΔW for `bone` and `mini`)."""
    variant: Literal["bone", "bat", "mini"] = "bone"
    """`bone` = MissConfig(init_weights=True), `bat` = 'bat' (needs n % r = m % r = 0), `mini` = 'mini'."""
    mini_r: int = Field(default=1, ge=1)
    """`mini` only: output-side width of the shared block (m % mini_r must be 0)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the Bone branch's input."""


class RoSAAdapter(_AdapterCommon):
    """RoSA: LoRA plus a fixed-support sparse delta chosen from accumulated squared gradients."""

    name: Literal["rosa"] = "rosa"
    r: int = Field(default=8, ge=0)
    """LoRA rank (0 = sparse adaptation only)."""
    alpha: float = Field(default=16.0, gt=0)
    """LoRA scaling numerator: s = alpha / r. The sparse part is not scaled."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    density: float = Field(default=0.002, gt=0, le=1)
    """Fraction of each targeted weight that the sparse delta may change."""
    warmup_steps: int = Field(default=4, ge=0)
    """LoRA-only optimizer steps before gradients are collected for the mask."""
    grad_collection_steps: int = Field(default=1, ge=1)
    """Optimizer steps whose dense weight gradients are accumulated to choose the mask."""
    grad_accumulation: Literal["mean_squared", "mean"] = "mean_squared"
    """Mask score: running mean of G² (empirical Fisher, the paper's default) or of G."""
    accumulator_dtype: Literal["float32", "bfloat16"] = "float32"
    """CPU accumulator precision (one m×n tensor per targeted layer during collection)."""
    restart_after_mask: bool = False
    """Reset both adapters, and their optimizer moments, after the mask is built (the paper's restart recipe)
    instead of continuing; that step's update is dropped."""
    impl: Literal["auto", "reference", "gather", "sampled"] = "auto"
    """Sparse path: `reference` (dense scatter + autograd), `gather` (custom Function, dense dOᵀX gathered),
    `sampled` (custom Function, torch.sparse.sampled_addmm); `auto` = gather."""


class PaCAAdapter(_AdapterCommon):
    """PaCA: r randomly chosen input columns of each weight are trained directly."""

    name: Literal["paca"] = "paca"
    r: int = Field(default=16, ge=1)
    """Columns trained per targeted weight (also the rank of its exact LoRA form)."""
    alpha: float = Field(default=16.0, gt=0)
    """Scaling numerator: the columns are s·P with s = alpha / r."""
    mode: Literal["functional", "fused"] = "functional"
    """`functional` never writes W0 (safe); `fused` writes s·P into W before each forward (one GEMM)."""


AdapterConfig = Annotated[LoRAAdapter | BoneAdapter | RoSAAdapter | PaCAAdapter, Field(discriminator="name")]
