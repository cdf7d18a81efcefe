import pytest
import torch

from rl.batch import RolloutBatch


def text_batch(completions, meta=None, groups=None, prompts=None) -> RolloutBatch:
    """A RolloutBatch whose only interesting parts are texts, meta and groups (what rewards read)."""
    n = len(completions)
    groups = list(groups) if groups is not None else list(range(n))
    ones = torch.ones(n, 2, dtype=torch.bool)
    return RolloutBatch(
        input_ids=torch.zeros(n, 2, dtype=torch.long), attention_mask=ones,
        loss_mask=ones & torch.tensor([False, True]), sampling_logprobs=torch.zeros(n, 2),
        prompt_lengths=torch.ones(n, dtype=torch.long), group_ids=torch.tensor(groups),
        policy_version=0, finish_reasons=["stop"] * n, prompt_texts=list(prompts or ["p"] * n),
        completion_texts=list(completions), sample_meta=list(meta or [{}] * n),
    ).validate()


@pytest.fixture
def make_batch():
    return text_batch
