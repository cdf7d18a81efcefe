"""RoSA: Robust Adaptation (Nikdan et al., arXiv 2401.04679) as a PEFT tuner, in pure PyTorch.

Per targeted linear (W0 ∈ R^{m×n}): ΔW = s·B A + S, with the LoRA part as in PEFT (A [r, n] kaiming, B [m, r]
zero, s = alpha/r or alpha/√r) and S sparse with a fixed support Ω of nnz = int(d·m·n) entries, stored as
`rosa_spa_values` [nnz] (trainable, zero at the start, no scaling) and `rosa_spa_idx` [nnz] int64 flat indices
row*n + col (sorted, persistent). Ω is chosen later from accumulated squared gradients (rosa_schedule.py);
until then `rosa_spa_ready` is False, S is skipped in the forward and its values get no gradient.

Two forward paths that agree (ADAPTERS.md §3.3, tested):
* `reference`: S densified by scatter, `F.linear(x, S)` added; autograd gives dvalues = (dOᵀX)[Ω].
* `gather` / `sampled`: `RosaSpAdd`, a custom Function computing x (W0+S)ᵀ + b with one GEMM, saving only x
  (LoRA keeps x anyway) and rebuilding W0+S in backward; dvalues come from a transient dense dOᵀX (`gather`)
  or from `torch.sparse.sampled_addmm` on the CSR pattern of Ω (`sampled`, PyTorch's SDDMM).
"""

from __future__ import annotations

import math
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

ROSA = "ROSA"
RosaImpl = Literal["reference", "gather", "sampled"]


@dataclass
class RosaConfig(PeftConfig):
    """PEFT config of RoSA (the LoRA fields mirror `LoraConfig`)."""

    r: int = field(default=8, metadata={"help": "LoRA rank; 0 = sparse part only"})
    lora_alpha: float = field(default=8.0)
    lora_dropout: float = field(default=0.0)
    use_rslora: bool = field(default=False)
    density: float = field(default=0.003, metadata={"help": "nnz = int(density * m * n) per layer"})
    impl: str = field(default="gather", metadata={"help": "reference | gather | sampled"})
    target_modules: list[str] | set[str] | str | None = field(default=None)  # a list becomes a set (post-init)
    exclude_modules: list[str] | str | None = field(default=None)
    bias: str = field(default="none")
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ROSA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.impl not in ("reference", "gather", "sampled"):
            raise ValueError(f"RoSA impl must be reference, gather or sampled, not {self.impl!r}")


def dense_sparse(values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """S as a dense [m, n] tensor: zeros with `values` [nnz] scattered at flat `idx` [nnz] (differentiable)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return flat.scatter(0, idx, values).view(shape)


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """(dOᵀ X) at the flat positions idx: [nnz]. grad_out [T, m], x [T, n]; idx sorted, unique."""
    if how == "sampled":
        m = grad_out.shape[1]
        rows, cols = idx // n, idx % n
        crow = torch.zeros(m + 1, dtype=torch.int64, device=idx.device)
        crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(idx, dtype=x.dtype), (m, n),
                                          check_invariants=False)  # built sorted and in range above
        return torch.sparse.sampled_addmm(pattern, grad_out.t().contiguous(), x, beta=0.0).values()
    return (grad_out.t() @ x).flatten()[idx]  # transient dense [m, n]


class RosaSpAdd(torch.autograd.Function):
    """y = x (W0 + S)ᵀ + b with S = scatter(values, idx); W0 frozen. x [..., n] -> y [..., m]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                idx: torch.Tensor, how: str) -> torch.Tensor:
        w_eff = weight.flatten().index_add(0, idx, values.to(weight.dtype)).view_as(weight)  # temporary [m, n]
        y = F.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, values, idx)
        ctx.weight, ctx.how, ctx.has_bias = weight, how, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, values, idx = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("RoSA keeps W0 frozen; set requires_grad=False on the base weight")
        weight = ctx.weight
        dx = dvalues = dbias = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [T, m]
        if ctx.needs_input_grad[0]:
            w_eff = weight.flatten().index_add(0, idx, values.to(weight.dtype)).view_as(weight)  # rebuilt, not saved
            dx = grad_out @ w_eff.to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            dvalues = sampled_grad(g2, x2, idx, weight.shape[1], ctx.how).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = g2.sum(0)
        return dx, None, dbias, dvalues, None, None


class RosaLayer(nn.Module, BaseTunerLayer):
    """A Linear with a LoRA pair (`rosa_A`, `rosa_B`) and a fixed-support sparse delta (`rosa_spa_*`)."""

    adapter_layer_names = ("rosa_A", "rosa_B", "rosa_spa_values")
    other_param_names = ("rosa_spa_idx", "rosa_spa_ready", "rosa_r", "rosa_scaling", "rosa_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RosaConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"RoSA supports nn.Linear only, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rosa_A, self.rosa_B, self.rosa_dropout = nn.ModuleDict({}), nn.ModuleDict({}), nn.ModuleDict({})
        self.rosa_spa_values = nn.ParameterDict({})
        self.rosa_spa_idx = BufferDict({}, persistent=True)
        self.rosa_spa_ready = BufferDict({}, persistent=True)
        self.rosa_r: dict[str, int] = {}
        self.rosa_scaling: dict[str, float] = {}
        self.impl: str = config.impl
        self.probe: torch.Tensor | None = None  # dense zero delta whose .grad is dL/dW (mask collection)
        self._ready_cache: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(lambda module, keys: module._ready_cache.clear())
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: RosaConfig) -> None:
        m, n, r = self.out_features, self.in_features, config.r
        device = self.base_layer.weight.device
        nnz = int(config.density * m * n)
        self.rosa_r[adapter_name] = r
        self.rosa_scaling[adapter_name] = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r) if r else 0.0
        self.rosa_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if r > 0:
            self.rosa_A[adapter_name] = nn.Linear(n, r, bias=False, device=device)
            self.rosa_B[adapter_name] = nn.Linear(r, m, bias=False, device=device)
        self.rosa_spa_values[adapter_name] = nn.Parameter(torch.zeros(nnz, device=device))
        self.rosa_spa_idx[adapter_name] = torch.arange(nnz, dtype=torch.int64, device=device)  # placeholder
        self.rosa_spa_ready[adapter_name] = torch.zeros((), dtype=torch.bool, device=device)
        self.reset_adapter(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_adapter(self, adapter: str) -> None:
        """LoRA back to PEFT's default init (A kaiming, B = 0) and sparse values to 0; the support is kept."""
        with torch.no_grad():
            if adapter in self.rosa_A:
                lora_a, lora_b = self.lora_pair(adapter)
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                nn.init.zeros_(lora_b.weight)
            self.rosa_spa_values[adapter].zero_()

    def set_mask(self, adapter: str, idx: torch.Tensor) -> None:
        """Fix the support Ω: idx [nnz] flat indices (sorted here), values restart at 0."""
        values = self.rosa_spa_values[adapter]
        if idx.numel() != values.numel() or idx.unique().numel() != idx.numel():
            raise ValueError(f"RoSA mask needs {values.numel()} unique indices, got {idx.numel()}")
        with torch.no_grad():
            self.rosa_spa_idx[adapter].copy_(idx.sort().values)
            self.rosa_spa_ready[adapter].fill_(True)
            values.zero_()
        self._ready_cache[adapter] = True

    def lora_pair(self, adapter: str) -> tuple[nn.Linear, nn.Linear]:
        """(A [r, n], B [m, r]) of `adapter`: the `nn.Linear` layers `update_layer` put in the ModuleDicts."""
        lora_a, lora_b = self.rosa_A[adapter], self.rosa_B[adapter]
        assert isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
        return lora_a, lora_b

    def spa_ready(self, adapter: str) -> bool:
        if adapter not in self._ready_cache:  # cached: a .item() per forward would sync the GPU every layer
            self._ready_cache[adapter] = bool(self.rosa_spa_ready[adapter].item())
        return self._ready_cache[adapter]

    # ----- probe for the dense weight gradient ---------------------------------------------------
    def arm_probe(self) -> None:
        """From the next forward on, `probe.grad` accumulates dL/dW [m, n] (fp32)."""
        weight = self.base_layer.weight
        self.probe = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device, requires_grad=True)

    def take_probe_grad(self) -> torch.Tensor:
        """The dense gradient summed since arming ([m, n] fp32; zeros if no backward ran); re-arms the probe."""
        grad = self.probe.grad if self.probe is not None and self.probe.grad is not None else None
        if grad is None:
            grad = torch.zeros(self.base_layer.weight.shape, dtype=torch.float32)
        self.arm_probe()
        return grad

    def disarm_probe(self) -> None:
        self.probe = None

    # ----- weights ----------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = s·B A + S: [m, n] fp32 (S is zero until the mask is set)."""
        shape = (self.out_features, self.in_features)
        delta = torch.zeros(shape, device=self.base_layer.weight.device)
        if adapter in self.rosa_A:
            lora_a, lora_b = self.lora_pair(adapter)
            delta += self.rosa_scaling[adapter] * (lora_b.weight.float() @ lora_a.weight.float())
        if self.spa_ready(adapter):
            delta += dense_sparse(self.rosa_spa_values[adapter].float(), self.rosa_spa_idx[adapter], shape)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            weight = self.base_layer.weight
            with torch.no_grad():
                merged = weight.float() + self.get_delta_weight(adapter)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"RoSA adapter {adapter!r} has non-finite weights")
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.base_layer.weight
            with torch.no_grad():
                weight.copy_((weight.float() - self.get_delta_weight(adapter)).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # args: the base layer's
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = next(a for a in self.active_adapters if a in self.rosa_spa_values)
        base, values, idx = self.base_layer, self.rosa_spa_values[adapter], self.rosa_spa_idx[adapter]
        sparse = self.spa_ready(adapter) and values.numel() > 0
        if sparse and self.impl != "reference":
            y = RosaSpAdd.apply(x, base.weight, base.bias, values, idx, self.impl)
        else:
            y = base(x, *args, **kwargs)
            if sparse:
                rows, cols = base.weight.shape
                y = y + F.linear(x, dense_sparse(values, idx, (rows, cols)).to(x.dtype))
        if self.probe is not None:
            y = y + F.linear(x, self.probe.to(x.dtype))
        if adapter in self.rosa_A:
            lora_a, lora_b = self.lora_pair(adapter)
            h = self.rosa_dropout[adapter](x.to(lora_a.weight.dtype))
            y = y + (lora_b(lora_a(h)) * self.rosa_scaling[adapter]).to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "rosa." + super().__repr__()


class RosaModel(BaseTuner):
    """PEFT tuner wrapping targeted nn.Linear layers in `RosaLayer`."""

    prefix: str = "rosa_"
    tuner_layer_cls = RosaLayer
    # PEFT annotates the mapping's values as list[str] but fills this one (LoRA's own) with lists and tuples
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # type: ignore[assignment]

    # PEFT calls a tuner with its own config class only (its LoraModel narrows the argument the same way)
    def _create_and_replace(self, config: RosaConfig, adapter_name: str,  # type: ignore[override]
                            target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: object) -> None:
        if isinstance(target, RosaLayer):
            raise ValueError("RoSA supports one adapter per model")
        self._replace_module(parent, target_name, RosaLayer(target, adapter_name, config), target)


register_tuner(ROSA, RosaConfig, RosaModel, RosaModel.prefix)
