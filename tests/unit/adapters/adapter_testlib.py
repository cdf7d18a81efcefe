"""The ADAPTERS.md §8 fixture: a 2-layer tiny Llama built in code, and one case per adapter variant.

Targets q_proj (64×64), v_proj (32×64) and down_proj (64×176), so m ≠ n is covered, and MiSS r=48 runs its
zero-padding path (64 % 48 ≠ 0, 176 % 48 ≠ 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl.config.adapters import BoneAdapter, LoRAAdapter, PaCAAdapter, RoSAAdapter
from trainers.adapters import apply_adapter
from trainers.adapters.rosa import RosaLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 128


def build_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tokens(seed: int = 1, rows: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Case:
    """An adapter variant, its config and its trainable-parameter formula per layer (m out, n in)."""

    id: str
    cfg: Any
    per_layer: Callable[[int, int], int]


CASES = [
    Case("lora", LoRAAdapter(r=8, alpha=16, target_modules=TARGETS), lambda m, n: 8 * (n + m)),
    Case("miss", BoneAdapter(r=48, target_modules=TARGETS), lambda m, n: 48 * m),
    Case("miss-bat", BoneAdapter(r=16, variant="bat", target_modules=TARGETS), lambda m, n: m * 16),
    Case("miss-mini", BoneAdapter(r=16, variant="mini", mini_r=8, target_modules=TARGETS), lambda m, n: 16 * 8),
    Case("rosa", RoSAAdapter(r=8, alpha=16, density=0.05, impl="reference", target_modules=TARGETS),
         lambda m, n: 8 * (n + m) + int(0.05 * m * n)),
    Case("rosa-gather", RoSAAdapter(r=8, alpha=16, density=0.05, impl="gather", target_modules=TARGETS),
         lambda m, n: 8 * (n + m) + int(0.05 * m * n)),
    Case("paca", PaCAAdapter(r=8, alpha=16, target_modules=TARGETS), lambda m, n: 8 * m),
    Case("paca-fused", PaCAAdapter(r=8, alpha=16, mode="fused", target_modules=TARGETS), lambda m, n: 8 * m),
]


def adapted(case: Case, seed: int = 0) -> Any:
    """(PEFT model, untouched base-model copy) with RoSA masks set at random so the sparse part is live."""
    base = build_lm(seed)
    reference = build_lm(seed)
    model = apply_adapter(base, case.cfg)
    torch.manual_seed(seed + 100)
    for layer in model.modules():
        if isinstance(layer, RosaLayer):
            nnz = layer.rosa_spa_values["default"].numel()
            layer.set_mask("default", torch.randperm(layer.out_features * layer.in_features)[:nnz])
    return model, reference


def randomise_adapter(model: Any, scale: float = 0.05) -> None:
    """Give every trainable adapter tensor random values (zero-initialised parts would hide bugs)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def train_step(model: Any, lr: float = 1e-2) -> None:
    """One AdamW step on a causal-LM loss over a fixed random batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    ids = tokens(seed=3, rows=3, length=12)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def base_key(peft_name: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj`."""
    return peft_name.removeprefix("base_model.model.")
