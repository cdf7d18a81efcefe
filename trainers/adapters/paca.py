"""PaCA: Partial Connection Adaptation (Woo et al., ICLR 2025, arXiv 2503.01905) as a PEFT tuner.

Per targeted linear (W0 ∈ R^{m×n}), r input columns `idx` are chosen uniformly at random and trained directly:
W_eff = W0 with columns idx replaced by s·P, P ∈ R^{m×r}, s = alpha/r, initialised to P = W0[:, idx]/s.
Equivalently ΔW = (s·P − W0[:, idx]) E_idxᵀ, a rank-r LoRA with one-hot A (ADAPTERS.md §4).

Departures from the authors' code (§4.2), each on purpose:
* the original columns are kept (`paca_W0_cols`), so `disable_adapter()` and unmerge give W0 exactly —
  the RL reference policy is the adapter-disabled model;
* the default `functional` mode never writes W0; `fused` (one GEMM, the paper's speed) writes s·P into W
  before each adapted forward and restores W0_cols on disable/unmerge;
* the custom Function handles any leading input shape and saves only x[..., idx] (T×r) of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from trainers.adapters.peft_glue import register_tuner

PACA = "PACA"


@dataclass
class PacaConfig(PeftConfig):
    """PEFT config of PaCA; `mode` picks the functional (safe) or fused (one-GEMM) forward."""

    r: int = field(default=8, metadata={"help": "columns trained per targeted linear"})
    paca_alpha: float = field(default=8.0, metadata={"help": "s = paca_alpha / r"})
    target_modules: list[str] | set[str] | str | None = field(default=None)  # a list becomes a set (post-init)
    exclude_modules: list[str] | str | None = field(default=None)
    mode: Literal["functional", "fused"] = field(default="functional")
    bias: str = field(default="none")
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PACA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class PacaFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + x[..., idx] (s·P − W0_cols)ᵀ, saving only x[..., idx] of the activations.

    x: [..., n]; weight W0: [m, n] (frozen); p: [m, r] trainable; w0_cols: [m, r]; idx: [r] int64.
    The frozen W0 is kept on ctx rather than saved: it is a parameter, not an activation, and saving it
    through save_for_backward would only add a version-counter check that functional mode never trips.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: torch.Tensor,
                w0_cols: torch.Tensor, idx: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
        x_cols = x[..., idx]  # [..., r]
        if fused:  # weight already holds s·P in columns idx
            y = F.linear(x, weight, bias)
        else:
            y = F.linear(x, weight, bias) + F.linear(x_cols, (scale * p - w0_cols).to(x.dtype))
        ctx.save_for_backward(x_cols, p, w0_cols, idx)
        ctx.weight, ctx.scale, ctx.fused, ctx.has_bias = weight, scale, fused, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_cols, p, w0_cols, idx = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("PaCA keeps W0 frozen; set requires_grad=False on the base weight")
        dx = dbias = dp = None
        if ctx.needs_input_grad[0]:
            dx = grad_out @ ctx.weight.to(grad_out.dtype)  # [..., n]
            if not ctx.fused:
                dx[..., idx] += grad_out @ (ctx.scale * p - w0_cols).to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [T, m]
            dp = (ctx.scale * (g2.t() @ x_cols.reshape(-1, x_cols.shape[-1]))).to(p.dtype)  # [m, r]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return dx, None, dbias, dp, None, None, None, None


class PacaLayer(nn.Module, BaseTunerLayer):
    """A Linear whose r columns `paca_idx` are the trainable `paca_P` (times s)."""

    adapter_layer_names = ("paca_P",)
    other_param_names = ("paca_idx", "paca_W0_cols", "paca_r", "paca_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PacaConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"PaCA supports nn.Linear only, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.paca_P = nn.ParameterDict({})
        self.paca_idx = BufferDict({}, persistent=True)
        self.paca_W0_cols = BufferDict({}, persistent=True)
        self.paca_r: dict[str, int] = {}
        self.paca_scaling: dict[str, float] = {}
        self.mode = config.mode
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._fused_written = False  # fused mode: W[:, idx] currently holds s·P instead of W0_cols
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PacaConfig) -> None:
        r, n = config.r, self.in_features
        if not 0 < r <= n:
            raise ValueError(f"PaCA r={r} must be in [1, in_features={n}]")
        idx = torch.randperm(n)[:r].sort().values  # global RNG: the job's seed fixes the choice; sorted gathers
        weight = self.base_layer.weight
        scale = config.paca_alpha / r
        w0_cols = weight.detach()[:, idx.to(weight.device)].clone()  # [m, r]
        self.paca_r[adapter_name], self.paca_scaling[adapter_name] = r, scale
        self.paca_idx[adapter_name] = idx.to(weight.device)
        self.paca_W0_cols[adapter_name] = w0_cols
        self.paca_P[adapter_name] = nn.Parameter(w0_cols.float() / scale)
        self.set_adapter(self.active_adapters)

    # ----- weights ----------------------------------------------------------------------------
    def scaled_p(self, adapter: str) -> torch.Tensor:
        """s·P: [m, r], in P's dtype."""
        return self.paca_scaling[adapter] * self.paca_P[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = (s·P − W0_cols) E_idxᵀ: [m, n], non-zero only in columns idx (fp32)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.paca_P[adapter].device)
        delta[:, self.paca_idx[adapter]] = self.scaled_p(adapter).float() - self.paca_W0_cols[adapter].float()
        return delta

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """W_eff out of place: W0 with columns idx set to s·P (cast to the weight dtype), [m, n]."""
        weight = self.base_layer.weight.detach().clone()
        weight[:, self.paca_idx[adapter]] = self.scaled_p(adapter).detach().to(weight.dtype)
        return weight

    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA form (alpha = r, scaling 1): A = one_hot(idx) [r, n], B = s·P − W0_cols [m, r], fp32."""
        idx = self.paca_idx[adapter]
        a = F.one_hot(idx, self.in_features).float()
        b = (self.scaled_p(adapter).detach().float() - self.paca_W0_cols[adapter].float())
        return a, b

    def _write_cols(self, cols: torch.Tensor, adapter: str) -> None:
        with torch.no_grad():
            weight = self.base_layer.weight
            weight[:, self.paca_idx[adapter]] = cols.to(weight.dtype)

    def _restore_w0(self) -> None:
        if self._fused_written:
            self._write_cols(self.paca_W0_cols[self._only_adapter()], self._only_adapter())
            self._fused_written = False

    def _only_adapter(self) -> str:
        names = [a for a in self.active_adapters if a in self.paca_P]
        if len(names) != 1:
            raise ValueError(f"PaCA layers run exactly one active adapter, got {names}")
        return names[0]

    # ----- PEFT's tuner-layer interface -------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W[:, idx] ← s·P (the columns are replaced, not added to, so one adapter at a time)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if self.merged_adapters:
                raise ValueError("PaCA replaces columns; merge a single adapter only")
            cols = self.scaled_p(adapter).detach()
            if safe_merge and not torch.isfinite(cols).all():
                raise ValueError(f"PaCA adapter {adapter!r} has non-finite weights")
            self._write_cols(cols, adapter)
            self._fused_written = False
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """W[:, idx] ← W0_cols: exact, whatever the dtype."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            self._write_cols(self.paca_W0_cols[adapter], adapter)

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            self._restore_w0()  # fused mode: disabling must give W0 at once, not at the next forward
        super().enable_adapters(enabled)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # args: the base layer's
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._restore_w0()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._only_adapter()
        fused = self.mode == "fused"
        if fused:  # the paper's single GEMM; see the module docstring for the interleaving hazard
            self._write_cols(self.scaled_p(adapter).detach(), adapter)
            self._fused_written = True
        base = self.base_layer
        return PacaFunction.apply(x, base.weight, base.bias, self.paca_P[adapter], self.paca_W0_cols[adapter],
                                  self.paca_idx[adapter], self.paca_scaling[adapter], fused)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "paca." + super().__repr__()


class PacaModel(BaseTuner):
    """PEFT tuner wrapping targeted nn.Linear layers in `PacaLayer`."""

    prefix: str = "paca_"
    tuner_layer_cls = PacaLayer
    # PEFT annotates the mapping's values as list[str] but fills this one (LoRA's own) with lists and tuples
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # type: ignore[assignment]

    # PEFT calls a tuner with its own config class only (its LoraModel narrows the argument the same way)
    def _create_and_replace(self, config: PacaConfig, adapter_name: str,  # type: ignore[override]
                            target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: object) -> None:
        if isinstance(target, PacaLayer):
            raise ValueError("PaCA supports one adapter per model (columns are replaced, not added)")
        self._replace_module(parent, target_name, PacaLayer(target, adapter_name, config), target)


register_tuner(PACA, PacaConfig, PacaModel, PacaModel.prefix)
