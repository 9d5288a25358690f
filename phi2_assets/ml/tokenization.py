"""Tokenizing prompt + summary for causal-LM fine-tuning, with loss on the summary only.

A sequence is `[BOS] before(template) article[:budget] after(template) summary EOS`: the article is cut so
that the whole fits `max_length`; the summary never is (a row whose summary cannot fit is dropped and counted).
Generation encodes prompts with the same function, so training and inference see identical token boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from phi2_assets.ml.prompts import split_template
from phi2_assets.ml.settings import documented

IGNORE_INDEX = -100
# An article keeps at least this many tokens, or the row is dropped as `summary_too_long`.
MIN_ARTICLE_TOKENS = 16
MIN_SUMMARY_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    """How training sequences are built; the `phi2` profile holds the seed's max length."""

    template: str = documented("prompt template name (phi2_assets.ml.prompts.TEMPLATES)", "seed")
    max_length: int = documented("tokens per sequence; the article is cut to fit, never the summary", 1_126)
    batch_size: int = documented("rows per tokenizer call", 1_000)

    def __post_init__(self) -> None:
        split_template(self.template)  # raises for an unknown template
        if self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """Template pieces tokenized once, and the rule that fits an article into the budget."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    eos_id: int

    @classmethod
    def create(cls, tokenizer: PreTrainedTokenizerBase, template: str) -> PromptEncoder:
        before, after = split_template(template)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and _adds_bos(tokenizer):
            prefix = [bos, *prefix]
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: a summary would never end")
        return cls(prefix, tokenizer(after, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)

    def prompt(self, article_ids: Sequence[int], budget: int) -> list[int]:
        return [*self.prefix_ids, *article_ids[: max(budget, 0)], *self.suffix_ids]

    @property
    def fixed_length(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens. A fast tokenizer's Rust backend encodes the batch on every core and
    skips the character offsets `tokenizer(...)` would compute and discard."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, template: str, articles: Sequence[str],
                   max_prompt_tokens: int) -> list[list[int]]:
    """Prompt token ids for generation, articles truncated so each prompt fits `max_prompt_tokens`."""
    encoder = PromptEncoder.create(tokenizer, template)
    return [encoder.prompt(ids, max_prompt_tokens - encoder.fixed_length) for ids in token_ids(tokenizer, articles)]


def check_room_for_prompt(encoder: PromptEncoder, settings: TokenizeSettings) -> None:
    """Fail before any work when `max_length` cannot hold the template, some article and a summary."""
    fixed = encoder.fixed_length
    needed = fixed + MIN_ARTICLE_TOKENS + MIN_SUMMARY_TOKENS
    if settings.max_length < needed:
        raise ValueError(
            f"max_length {settings.max_length} is below what the {settings.template!r} prompt needs: {fixed} template "
            f"tokens + {MIN_ARTICLE_TOKENS} article tokens + {MIN_SUMMARY_TOKENS} summary tokens = {needed}"
        )


def tokenize_dataset(rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                     settings: TokenizeSettings) -> tuple[datasets.Dataset, int]:
    """Tokenize a split; returns the training rows and how many were dropped because the summary could not fit.

    Batches go straight from the tokenizer into Arrow columns: no `datasets.map`, whose per-batch cache writes
    and (with `num_proc`) per-process tokenizer copies cost more than the tokenizing itself on a 2-core machine.
    """
    encoder = PromptEncoder.create(tokenizer, settings.template)
    check_room_for_prompt(encoder, settings)
    columns: dict[str, list] = {name: [] for name in ("id", "input_ids", "labels", "prompt_tokens",
                                                      "article_truncated")}
    dropped = 0
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start : start + settings.batch_size]
        articles, summaries = token_ids(tokenizer, batch["document"]), token_ids(tokenizer, batch["summary"])
        for row_id, article, summary in zip(batch["id"], articles, summaries, strict=True):
            target = [*summary, encoder.eos_id]
            budget = settings.max_length - encoder.fixed_length - len(target)
            if budget < MIN_ARTICLE_TOKENS:
                dropped += 1
                continue
            prompt = encoder.prompt(article, budget)
            columns["id"].append(row_id)
            columns["input_ids"].append(prompt + target)
            columns["labels"].append([IGNORE_INDEX] * len(prompt) + target)
            columns["prompt_tokens"].append(len(prompt))
            columns["article_truncated"].append(len(article) > budget)
    token_lists = pa.list_(pa.int32())
    table = pa.table({
        "id": pa.array(columns["id"], pa.string()),
        "input_ids": pa.array(columns["input_ids"], token_lists),
        "labels": pa.array(columns["labels"], token_lists),
        "prompt_tokens": pa.array(columns["prompt_tokens"], pa.int32()),
        "article_truncated": pa.array(columns["article_truncated"], pa.bool_()),
    })
    return datasets.Dataset(table), dropped


@dataclasses.dataclass(frozen=True)
class TokenStats:
    sequences: int
    tokens: int
    supervised_tokens: int
    mean_length: float
    p95_length: float
    max_length: int
    article_truncated_share: float
    lengths: list[int]


def token_stats(encoded: datasets.Dataset) -> TokenStats:
    lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(encoded))
    prompts = np.asarray(encoded["prompt_tokens"], dtype=np.int64)
    truncated = np.asarray(encoded["article_truncated"], dtype=bool)
    empty = len(lengths) == 0
    return TokenStats(
        sequences=len(lengths),
        tokens=int(lengths.sum()),
        supervised_tokens=int((lengths - prompts).sum()),
        mean_length=0.0 if empty else float(lengths.mean()),
        p95_length=0.0 if empty else float(np.percentile(lengths, 95)),
        max_length=0 if empty else int(lengths.max()),
        article_truncated_share=0.0 if empty else float(truncated.mean()),
        lengths=lengths.tolist(),
    )
