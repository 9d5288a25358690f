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
from transformers import PreTrainedTokenizerBase

from phi2_assets.ml.prompts import split_template

IGNORE_INDEX = -100
# An article keeps at least this many tokens, or the row is dropped as `summary_too_long`.
MIN_ARTICLE_TOKENS = 16
MIN_SUMMARY_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    template: str = "seed"
    max_length: int = 1_126
    num_proc: int = 1
    batch_size: int = 1_000

    def __post_init__(self) -> None:
        split_template(self.template)  # raises for an unknown template
        if self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {self.max_length}")
        if self.num_proc < 1 or self.batch_size < 1:
            raise ValueError("num_proc and batch_size must be at least 1")


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


def encode_prompts(tokenizer: PreTrainedTokenizerBase, template: str, articles: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Prompt token ids for generation, articles truncated so each prompt fits `max_prompt_tokens`."""
    encoder = PromptEncoder.create(tokenizer, template)
    article_ids = tokenizer(list(articles), add_special_tokens=False)["input_ids"]
    return [encoder.prompt(ids, max_prompt_tokens - encoder.fixed_length) for ids in article_ids]


def tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, template: str, max_length: int) -> dict[str, list]:
    """`datasets.map` function: documents and summaries in, training columns out (rows may be dropped)."""
    encoder = PromptEncoder.create(tokenizer, template)
    articles = tokenizer(batch["document"], add_special_tokens=False)["input_ids"]
    summaries = tokenizer(batch["summary"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "prompt_tokens": [], "article_truncated": [], "summary_fits": []}
    for row_id, article, summary in zip(batch["id"], articles, summaries):
        target = [*summary, encoder.eos_id]
        budget = max_length - encoder.fixed_length - len(target)
        fits = budget >= MIN_ARTICLE_TOKENS
        prompt = encoder.prompt(article, budget) if fits else []
        out["id"].append(row_id)
        out["input_ids"].append([*prompt, *target] if fits else [])
        out["labels"].append([IGNORE_INDEX] * len(prompt) + target if fits else [])
        out["prompt_tokens"].append(len(prompt))
        out["article_truncated"].append(fits and len(article) > budget)
        out["summary_fits"].append(fits)
    return out


def check_room_for_prompt(tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> None:
    """Fail before any work when `max_length` cannot hold the template, some article and a summary."""
    fixed = PromptEncoder.create(tokenizer, settings.template).fixed_length
    needed = fixed + MIN_ARTICLE_TOKENS + MIN_SUMMARY_TOKENS
    if settings.max_length < needed:
        raise ValueError(
            f"max_length {settings.max_length} is below what the {settings.template!r} prompt needs: {fixed} template "
            f"tokens + {MIN_ARTICLE_TOKENS} article tokens + {MIN_SUMMARY_TOKENS} summary tokens = {needed}"
        )


def tokenize_dataset(frame_rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> tuple[datasets.Dataset, int]:
    """Tokenize a split; returns the training rows and how many were dropped because the summary could not fit."""
    check_room_for_prompt(tokenizer, settings)
    encoded = frame_rows.map(
        tokenize_batch,
        batched=True,
        batch_size=settings.batch_size,
        num_proc=settings.num_proc if settings.num_proc > 1 else None,
        remove_columns=frame_rows.column_names,
        fn_kwargs={"tokenizer": tokenizer, "template": settings.template, "max_length": settings.max_length},
        desc="tokenizing",
    )
    fits = np.asarray(encoded["summary_fits"])
    kept = encoded.select(np.flatnonzero(fits)).remove_columns("summary_fits")
    return kept, int((~fits).sum())


@dataclasses.dataclass(frozen=True)
class TokenStats:
    sequences: int
    tokens: int
    supervised_tokens: int
    mean_length: float
    p95_length: float
    max_length: int
    truncated_share: float
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
        truncated_share=0.0 if empty else float(truncated.mean()),
        lengths=lengths.tolist(),
    )
