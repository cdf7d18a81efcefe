"""Plugging the project's own tuners (RoSA, PaCA) into PEFT 0.21.2 (ADAPTERS.md §6).

`register_peft_method` only accepts names already in PEFT's closed `PeftType` enum, so the project inserts
string keys into PEFT's three plain-dict mappings instead. `PeftType` is a `str` enum, so `"PACA"` works as a
key everywhere PEFT looks one up (`get_peft_model`, `PeftConfig.from_pretrained`, state-dict helpers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

if TYPE_CHECKING:
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner

V = TypeVar("V")


def register_tuner(peft_type: str, config_cls: type[PeftConfig], model_cls: type[BaseTuner], prefix: str) -> None:
    """Make `peft_type` (e.g. "PACA") a PEFT method; idempotent, refuses to shadow a different class."""
    _register(PEFT_TYPE_TO_CONFIG_MAPPING, peft_type, config_cls)
    _register(PEFT_TYPE_TO_TUNER_MAPPING, peft_type, model_cls)
    _register(PEFT_TYPE_TO_PREFIX_MAPPING, peft_type, prefix)


def _register(mapping: dict[Any, V], peft_type: str, value: V) -> None:
    """One mapping's entry. PEFT types the keys as `PeftType`; a plain str key is what this module is for (above)."""
    existing = mapping.get(peft_type)
    if existing is not None and existing != value and getattr(existing, "__qualname__", None) != getattr(
            value, "__qualname__", object()):
        raise ValueError(f"PEFT type {peft_type!r} is already registered as {existing!r}")
    mapping[peft_type] = value
