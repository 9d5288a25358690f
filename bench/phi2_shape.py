"""A randomly initialised model of microsoft/phi-2's shape, a stand-in tokenizer and XSum-shaped token data.

The GPU benchmarks build what they need instead of downloading it: `PhiConfig` with phi-2's
config.json values, saved as safetensors so the project's loader quantizes it to 4-bit NF4 exactly as it would
the real checkpoint; a word-level tokenizer with phi-2's vocabulary size and EOS id (one token per word, so a
synthetic article of n words is n tokens) or a byte-level BPE tokenizer trained on real text; and token sequences
with XSum's length distribution.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch

VOCAB_SIZE = 51_200
EOS_ID = 50_256  # phi-2's <|endoftext|>, also its BOS
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
MEAN_TOKENS = 484  # XSum prompt + summary with phi-2's tokenizer, after truncation
MAX_TOKENS = 1_126  # the seed's max length
SUMMARY_MEAN_TOKENS = 30


def phi2_config():
    from transformers import PhiConfig

    # microsoft/phi-2 config.json (resid_pdrop 0.1 included: it is part of the model's training-time graph)
    return PhiConfig(
        vocab_size=VOCAB_SIZE, hidden_size=2_560, intermediate_size=10_240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4, hidden_act="gelu_new",
        layer_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2_048, rope_theta=10_000.0,
        resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
    )


def word(token_id: int) -> str:
    return f"w{token_id}"


def build_tokenizer():
    """Word-level tokenizer: id i <-> "w{i}", EOS at phi-2's id, unknown words (the template's) -> id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(VOCAB_SIZE)}
    vocab[UNKNOWN] = 0
    vocab[END_OF_TEXT] = EOS_ID
    del vocab[word(0)], vocab[word(EOS_ID)]
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=UNKNOWN
    )


def save_phi2_shape(target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Random phi-2-shaped weights and the word-level tokenizer, safetensors."""
    return save_checkpoint(target, phi2_config(), build_tokenizer(), dtype)


def sample_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on `texts`, with EOS `<|endoftext|>` (the
    tokenizer the tiny profile's model gets, at another size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )


def save_checkpoint(target: Path, config, tokenizer, dtype: torch.dtype) -> Path:
    """Random weights of `config` (initialised on the GPU when there is one: seconds instead of a minute for phi-2's
    size) and `tokenizer`, as safetensors, written whole or not at all; an existing checkpoint is kept."""
    from transformers import PhiForCausalLM

    from phi2_assets.ml.atomic import atomic_path

    if (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file():
        return target
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = PhiForCausalLM(config).to(dtype)
    with atomic_path(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    del model
    torch.cuda.empty_cache()
    return target


def xsum_lengths(count: int, rng: np.random.Generator) -> np.ndarray:
    """Sequence lengths: log-normal (sigma 0.55) cut at 1,126, its location chosen so the mean is 484."""
    raw = rng.lognormal(0.0, 0.55, size=count)
    scale = MEAN_TOKENS / raw.mean()
    for _ in range(50):  # truncation lowers the mean: raise the scale until the truncated mean is right
        scale *= MEAN_TOKENS / np.minimum(raw * scale, MAX_TOKENS).mean()
    return np.clip(np.rint(raw * scale), 96, MAX_TOKENS).astype(np.int64)


def synthetic_tokenized_xsum(count: int, seed: int = 0) -> datasets.Dataset:
    """Rows like the `tokenized_xsum` asset's: prompt tokens (label -100), then a ~30-token summary and EOS.

    Tokens are Zipf-distributed and the summary repeats the article's lead, so there is something to learn and
    the loss after a fixed number of steps is comparable between recipes.
    """
    rng = np.random.default_rng(seed)
    lengths = xsum_lengths(count, rng)
    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "prompt_tokens": [], "article_truncated": []}
    for index, length in enumerate(lengths):
        summary_len = int(np.clip(rng.normal(SUMMARY_MEAN_TOKENS, 8), 8, 60))
        prompt_len = int(length) - summary_len - 1
        prompt = zipf_tokens(prompt_len, rng)
        summary = prompt[1 : 1 + summary_len]
        rows["id"].append(str(index))
        rows["input_ids"].append([*prompt, *summary, EOS_ID])
        rows["labels"].append([-100] * prompt_len + [*summary, EOS_ID])
        rows["prompt_tokens"].append(prompt_len)
        rows["article_truncated"].append(bool(length >= MAX_TOKENS))
    return datasets.Dataset.from_dict(rows)


def zipf_tokens(count: int, rng: np.random.Generator) -> list[int]:
    ids = rng.zipf(1.2, size=count) % (VOCAB_SIZE - 1) + 1
    ids[ids == EOS_ID] = EOS_ID + 1
    return ids.tolist()


def synthetic_articles(count: int, seed: int = 1) -> list[str]:
    """Article texts whose token counts follow XSum's prompt lengths (one stand-in token per word)."""
    rng = np.random.default_rng(seed)
    lengths = xsum_lengths(count, rng) - SUMMARY_MEAN_TOKENS - 20  # minus summary and template tokens
    return [" ".join(word(i) for i in zipf_tokens(int(max(n, 16)), rng)) for n in lengths]
