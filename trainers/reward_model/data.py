"""Preference pairs: read through `datasets` (JSONL, Parquet, CSV), split and ordered deterministically.

The order of training pairs is a pure function of (seed, step), so a resumed run reads exactly the pairs an
uninterrupted one would: epoch e is a permutation drawn from a generator seeded with (seed, e), and step s
takes the `s % steps_per_epoch`-th slice of epoch `s // steps_per_epoch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rl.config.reward_model_job import PREFERENCE_FORMATS, PreferenceData
from rl.errors import UserError

SPLIT_SALT = 7919  # the held-out split and the epoch orders use different streams of the same seed


@dataclass(frozen=True)
class Pair:
    prompt: str | None
    chosen: str
    rejected: str


def read_pairs(path: str, cfg: PreferenceData) -> list[Pair]:
    """Every row of a preference file as a Pair; a missing column or an empty file is a UserError."""
    import datasets

    datasets.disable_progress_bars()
    builder = PREFERENCE_FORMATS[Path(path).suffix]
    table = None
    if Path(path).stat().st_size > 0:  # `datasets` answers an empty file with a bare StopIteration
        try:
            table = datasets.load_dataset(builder, data_files=path, split="train")
        except (datasets.exceptions.DatasetsError, ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
            why = str(exc.__cause__ or exc).splitlines()[0][:300]  # DatasetGenerationError wraps the parser's
            raise UserError(f"cannot read the preference file {path} as {builder.upper()}: {why}. Give one "
                            f"preference pair per row (columns {cfg.chosen_column!r}, {cfg.rejected_column!r} and "
                            f"optionally {cfg.prompt_column!r}).") from None
    found = list(table.column_names) if table is not None else []
    missing = [c for c in (cfg.chosen_column, cfg.rejected_column) if c not in found]
    if table is None or missing or len(table) == 0:
        problem = "has no rows" if table is None or len(table) == 0 else f"lacks the column(s) {missing}"
        raise UserError(f"the preference file {path} {problem} (columns found: {found or 'none'}). Each row needs "
                        f"the preferred response in {cfg.chosen_column!r} and the other in {cfg.rejected_column!r} "
                        f"(optionally the question in {cfg.prompt_column!r}); rename the columns in the file or "
                        "set data.chosen_column / data.rejected_column / data.prompt_column to yours.")
    assert table is not None  # for mypy: an empty or unreadable file raised above
    prompt_col = cfg.prompt_column if cfg.prompt_column in found else None
    prompts = table[prompt_col] if prompt_col else [None] * len(table)
    return [Pair(None if p is None else str(p), str(c), str(r))
            for p, c, r in zip(prompts, table[cfg.chosen_column], table[cfg.rejected_column])]


def load_split(cfg: PreferenceData, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs: `test_path`'s pairs, or a `test_fraction` share chosen by `seed`."""
    pairs = read_pairs(cfg.path, cfg)
    if cfg.test_path is not None:
        return pairs, read_pairs(cfg.test_path, cfg)
    n_test = max(1, round(cfg.test_fraction * len(pairs)))
    if n_test >= len(pairs):
        raise UserError(f"the preference file {cfg.path} has {len(pairs)} pair(s): too few to hold out "
                        f"{cfg.test_fraction:.0%} and still train. Add pairs, lower data.test_fraction, or give "
                        "data.test_path.")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * SPLIT_SALT + 1)).tolist()
    return [pairs[i] for i in sorted(order[n_test:])], [pairs[i] for i in sorted(order[:n_test])]


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    return -(-n_pairs // batch_size)


def batch_indices(step: int, n_pairs: int, batch_size: int, seed: int) -> list[int]:
    """The training pairs of global step `step` (0-based): a slice of that epoch's seeded permutation."""
    per_epoch = steps_per_epoch(n_pairs, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * SPLIT_SALT + 2 + epoch))
    return order[index * batch_size:(index + 1) * batch_size].tolist()
