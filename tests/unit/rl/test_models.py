import pytest
import torch

from rl.errors import UserError
from rl.models import load_causal_lm, load_tokenizer, resolve_model


def test_tiny_llama_alias_is_a_real_loadable_model(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless round trip
    assert max(ids) < model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_llama_is_cached_and_deterministic(tmp_path, tiny_model_dir):
    again = resolve_model("tiny-llama", cache_dir=str(tmp_path))
    a = load_causal_lm(tiny_model_dir).state_dict()
    b = load_causal_lm(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_model("tiny-llama", cache_dir=str(tmp_path)) == again


def test_missing_or_broken_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a built-in alias"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_alias_loads_offline(smollm2_dir):
    model = load_causal_lm(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
