"""Plugging the project's own tuners (RoSA, PaCA) into PEFT 0.21.2 (ADAPTERS.md §6).

`register_peft_method` only accepts names already in PEFT's closed `PeftType` enum, so the project inserts
string keys into PEFT's three plain-dict mappings instead. `PeftType` is a `str` enum, so `"PACA"` works as a
key everywhere PEFT looks one up (`get_peft_model`, `PeftConfig.from_pretrained`, state-dict helpers).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


def register_tuner(peft_type: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make `peft_type` (e.g. "PACA") a PEFT method; idempotent, refuses to shadow a different class."""
    for mapping, value in ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
                           (PEFT_TYPE_TO_PREFIX_MAPPING, prefix)):
        existing = mapping.get(peft_type)
        if existing is not None and existing != value and getattr(existing, "__qualname__", None) != getattr(
                value, "__qualname__", object()):
            raise ValueError(f"PEFT type {peft_type!r} is already registered as {existing!r}")
        mapping[peft_type] = value
