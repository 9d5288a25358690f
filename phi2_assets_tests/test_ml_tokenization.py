"""Tokenization on the tiny model's tokenizer: the article is cut, the summary never is."""

import datasets
import pytest

from phi2_assets.ml.prompts import format_prompt
from phi2_assets.ml.tokenization import IGNORE_INDEX, TokenizeSettings, encode_prompts, tokenize_dataset


@pytest.fixture(scope="module")
def tokenizer(defs):
    from phi2_assets.resources import BaseModelResource

    resource = BaseModelResource()
    resource.setup_for_execution(None)
    return resource.tokenizer()


def rows(document, summary):
    return datasets.Dataset.from_dict({"id": ["a"], "document": [document], "summary": [summary]})


def test_long_article_is_truncated_and_summary_kept(tokenizer):
    summary = "Leeds council has voted to close three libraries."
    encoded, dropped = tokenize_dataset(rows("word " * 2_000, summary), tokenizer, TokenizeSettings(max_length=128))
    row = encoded[0]
    assert dropped == 0 and len(row["input_ids"]) == 128 and row["article_truncated"]
    supervised = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert supervised == [*tokenizer(summary, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert row["labels"][: row["prompt_tokens"]] == [IGNORE_INDEX] * row["prompt_tokens"]


def test_short_article_is_whole_and_matches_the_generation_prompt(tokenizer):
    article = "The council met on Tuesday."
    encoded, _ = tokenize_dataset(rows(article, "It met."), tokenizer, TokenizeSettings(max_length=128))
    row = encoded[0]
    prompt_ids = encode_prompts(tokenizer, "seed", [article], max_prompt_tokens=128)[0]
    assert not row["article_truncated"]
    assert row["input_ids"][: row["prompt_tokens"]] == prompt_ids
    assert tokenizer.decode(prompt_ids) == format_prompt("seed", article)


def test_summary_that_cannot_fit_is_dropped_not_cut(tokenizer):
    encoded, dropped = tokenize_dataset(rows("The council met.", "word " * 200), tokenizer,
                                        TokenizeSettings(max_length=96))
    assert len(encoded) == 0 and dropped == 1


def test_settings_reject_impossible_values(tokenizer):
    with pytest.raises(ValueError, match="unknown prompt template"):
        TokenizeSettings(template="nope")
    with pytest.raises(ValueError, match="max_length must be a positive"):
        TokenizeSettings(max_length=0)
    with pytest.raises(ValueError, match=r"max_length 24 is below what the 'seed' prompt needs"):
        tokenize_dataset(rows("The council met.", "It met."), tokenizer, TokenizeSettings(max_length=24))
