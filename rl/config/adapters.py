"""`adapter:` — parameter-efficient fine-tuning (ADAPTERS.md). null in the job = full fine-tuning."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from rl.config.base import Section

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class _AdapterCommon(Section):
    target_modules: list[str] = Field(default_factory=lambda: list(LINEAR_TARGETS))
    """Linear layers to adapt (module-name suffixes)."""


class LoRAAdapter(_AdapterCommon):
    """LoRA (PEFT `LoraConfig`): W0 + (alpha/r) B A."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class BoneAdapter(_AdapterCommon):
    """Bone / MiSS (PEFT `MissConfig`): a block shared across the weight's rows."""

    name: Literal["bone"] = "bone"
    r: int = Field(16, ge=1)
    variant: Literal["bone", "bat", "mini"] = "bone"
    """`bone` = MissConfig(init_weights=True), `bat` = 'bat', `mini` = 'mini'."""


class RoSAAdapter(_AdapterCommon):
    """RoSA: LoRA plus a fixed-support sparse delta chosen from accumulated squared gradients."""

    name: Literal["rosa"] = "rosa"
    r: int = Field(8, ge=0)
    alpha: float = Field(16.0, gt=0)
    density: float = Field(0.002, gt=0, le=1)
    """Fraction of each targeted weight that the sparse delta may change."""
    warmup_steps: int = Field(4, ge=0)
    """LoRA-only steps before gradients are collected for the mask."""
    grad_collection_steps: int = Field(1, ge=1)
    restart_after_mask: bool = False
    """Reset both adapters after the mask is built (the paper's restart recipe) instead of continuing."""


class PaCAAdapter(_AdapterCommon):
    """PaCA: r randomly chosen input columns of each weight are trained directly."""

    name: Literal["paca"] = "paca"
    r: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)


AdapterConfig = Annotated[Union[LoRAAdapter, BoneAdapter, RoSAAdapter, PaCAAdapter], Field(discriminator="name")]
