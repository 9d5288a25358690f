"""Batched summary generation: the same prompt tokens as training, left padding, new tokens only.

`generate_summaries` is a plain function (no Dagster) so benchmarks call exactly what the assets call. Every
article yields one `GenerationRecord` with a status: `ok`, `empty` (nothing before the first newline) or
`error` (generation raised even one row at a time); no row is ever dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from phi2_assets.ml import models, speedups
from phi2_assets.ml.prompts import TEMPLATES, split_template
from phi2_assets.ml.settings import documented
from phi2_assets.ml.speedups import batch_planning, kernels_ahead, shrinking_batch, static_decoding
from phi2_assets.ml.tokenization import encode_prompts

log = logging.getLogger(__name__)
STATUSES = ("ok", "empty", "error")
EVALUATION_SPLITS = ("validation", "test")
CACHE_KINDS = ("dynamic", "static")
# How a newline looks inside vocabulary entries: raw (SentencePiece, Gemma), byte-level BPE (GPT-2, Phi), byte fallback.
_NEWLINE_SPELLINGS = ("\n", "Ċ", "<0x0A>")
# Prompts per generate call where `batch_size` is 0 and the batch planner does not choose (CPU, or speed-ups off).
FIXED_BATCH = 8


@dataclasses.dataclass(frozen=True)
class EvaluationSetSettings:
    """Which cleaned rows every evaluation asset uses; the defaults are the seed's 500 validation samples."""

    split: str = documented("cleaned split to evaluate: validation or test (never train)", "validation")
    samples: int | None = documented("the split's first N rows; null = every row", 500)

    def __post_init__(self) -> None:
        if self.split not in EVALUATION_SPLITS:
            raise ValueError(f"split must be one of {EVALUATION_SPLITS}, got {self.split!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be at least 1 (or null for every row), got {self.samples}")

    def select(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The evaluation rows of the split's cleaned frame, in its order."""
        return frame.head(self.samples if self.samples is not None else len(frame)).reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class TemplateComparisonSettings:
    """Zero-shot comparison of prompt templates (the seed's prompt-engineering notebook)."""

    templates: tuple[str, ...] = documented("templates to compare, by name", tuple(TEMPLATES))
    samples: int = documented("evaluation rows per template (the first N)", 50)

    def __post_init__(self) -> None:
        for template in self.templates:
            split_template(template)
        if not self.templates or self.samples < 1:
            raise ValueError("name at least one template and at least one sample")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Decoding knobs; the defaults are the seed's (`phi2` profile)."""

    template: str = documented("prompt template; must be the one the adapter was trained with", "seed")
    max_new_tokens: int = documented("new tokens at most per summary (never max_length: the prompt does not count)", 60)
    num_beams: int = documented("beams; 1 = greedy", 1)
    batch_size: int = documented("prompts per generate call; 0 = on CUDA with speed-ups the split of length-sorted"
                                 " prompts a cost model finds quickest within free memory, else 8", 0)
    max_prompt_tokens: int = documented("prompt budget; the article is truncated to fit, never the template", 1_066)
    sort_by_length: bool = documented("batch prompts of similar length together, shortest first (less padding,"
                                      " shorter caches); output keeps input order", True)
    cache: str = documented("KV cache: `dynamic`, or `static` (preallocated per batch; with speed-ups prefilled in"
                            " chunks of similar length; greedy only)", "dynamic")
    cuda_graph: bool = documented("with the static cache and speed-ups on CUDA, replay each decoding step as a CUDA"
                                  " graph (one launch a step)", True)
    merged_bf16: bool = documented("evaluate on a bf16 copy of the base with the adapter merged in, instead of 4-bit"
                                   " + LoRA", False)
    speedups: bool = documented("run the speed-ups of phi2_assets.ml.speedups (same summaries); false = transformers'"
                                " generate as shipped", True)

    def __post_init__(self) -> None:
        split_template(self.template)  # raises for an unknown template
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be 0 (automatic) or positive, got {self.batch_size}")
        if self.max_prompt_tokens < 32:
            raise ValueError(f"max_prompt_tokens must be at least 32, got {self.max_prompt_tokens}")
        if self.cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, got {self.cache!r}")
        if self.cache == "static" and self.num_beams != 1:
            raise ValueError("cache='static' decodes greedily: beam search (num_beams > 1) needs cache='dynamic'")


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    text: str
    status: str
    new_tokens: int
    prompt_tokens: int
    hit_token_limit: bool
    error: str = ""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    records: list[GenerationRecord]
    seconds: float
    batch_sizes: list[int]
    batch_seconds: list[float]

    @property
    def batch_size(self) -> int:
        """The largest batch."""
        return max(self.batch_sizes, default=0)

    @property
    def summaries_per_second(self) -> float:
        return len(self.records) / self.seconds if self.seconds > 0 else 0.0

    @property
    def success_rate(self) -> float:
        return sum(r.status == "ok" for r in self.records) / len(self.records) if self.records else 0.0


def status_figures(summaries: pd.DataFrame) -> dict[str, object]:
    """Row count, share with status `ok`, empty and error counts, and the first error, of a summaries table."""
    status = summaries["status"]
    errors = summaries.loc[status == "error", "error"]
    return {
        "rows": len(summaries),
        "success_rate": round(float((status == "ok").mean()), 4) if len(summaries) else 0.0,
        "empty": int((status == "empty").sum()),
        "errors": len(errors),
        "first_error": errors.iloc[0] if len(errors) else "",
    }


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """EOS ids (tokenizer's and model's) plus every token whose text holds a newline: a summary is one line."""
    eos = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    candidates = [i for token, i in tokenizer.get_vocab().items() if any(s in token for s in _NEWLINE_SPELLINGS)]
    decoded = tokenizer.batch_decode([[i] for i in candidates])
    return sorted(ids | {i for i, text in zip(candidates, decoded, strict=True) if "\n" in text})


def _decodes_statically(settings: GenerationSettings) -> bool:
    return settings.cache == "static" and settings.speedups and static_decoding.available()


def _decodes_shrinking(settings: GenerationSettings) -> bool:
    return settings.cache == "dynamic" and settings.num_beams == 1 and settings.speedups and shrinking_batch.available()


def _generation_config(settings: GenerationSettings, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        cache_implementation="static" if settings.cache == "static" else None,
        min_new_tokens=1,  # no summary may end before it starts (a leading newline or EOS)
        num_beams=settings.num_beams,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )


def decoding_config(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase,
                    model: PreTrainedModel) -> GenerationConfig:
    """The `GenerationConfig` `generate_summaries` decodes with under `settings` (one line: newlines stop it)."""
    return _generation_config(settings, stop_token_ids(tokenizer, model), tokenizer.pad_token_id)


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of prompts padded on the left with `pad_id`, so that every prompt ends where
    generation starts (what `tokenizer.pad(..., padding_side="left")` gives, built in one array)."""
    lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
    columns = int(lengths.max(initial=0))
    mask = np.arange(columns) >= (columns - lengths)[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=int(lengths.sum()))
    return {"input_ids": torch.from_numpy(ids).to(device),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(device)}


def _generate_batch(model, tokenizer, prompts: list[list[int]], config: GenerationConfig, stop_ids: list[int],
                    settings: GenerationSettings) -> list[GenerationRecord]:
    padded = left_padded(prompts, tokenizer.pad_token_id, model.device)
    columns = padded["input_ids"].shape[1]
    if _decodes_statically(settings):
        cache_length = batch_planning.cache_length(columns, config.max_new_tokens)
        new_tokens = static_decoding.greedy_static(model, padded["input_ids"], padded["attention_mask"],
                                                   config.max_new_tokens, stop_ids, cache_length,
                                                   settings.cuda_graph).tolist()
    elif _decodes_shrinking(settings):
        new_tokens = shrinking_batch.greedy_shrinking(model, padded["input_ids"], padded["attention_mask"],
                                                      config.max_new_tokens, stop_ids)
    else:  # left padding: the new tokens start at one column
        new_tokens = model.generate(**padded, generation_config=config)[:, columns:].tolist()
    stop_set = set(stop_ids)
    records = []
    for prompt, tokens in zip(prompts, new_tokens, strict=True):
        stop_at = next((i for i, token in enumerate(tokens) if token in stop_set), None)
        kept = tokens if stop_at is None else tokens[: stop_at + 1]
        text = _first_line(tokenizer.decode(kept, skip_special_tokens=True))
        records.append(GenerationRecord(
            text=text, status="ok" if text else "empty", new_tokens=len(kept), prompt_tokens=len(prompt),
            hit_token_limit=stop_at is None and len(kept) >= config.max_new_tokens,
        ))
    return records


def _generate_or_isolate(model, tokenizer, prompts, config, stop_ids, settings) -> list[GenerationRecord]:
    """A failing batch (e.g. out of memory) is retried in halves down to single prompts, so one bad row costs only
    itself and an oversized batch only a few smaller calls."""
    try:
        return _generate_batch(model, tokenizer, prompts, config, stop_ids, settings)
    except Exception as error:  # noqa: BLE001 — every row must come back with a status
        if len(prompts) > 1:
            log.warning("batch of %d failed (%s); retrying in halves", len(prompts), error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(prompts) // 2
            return [record for part in (prompts[:half], prompts[half:])
                    for record in _generate_or_isolate(model, tokenizer, part, config, stop_ids, settings)]
        return [GenerationRecord("", "error", 0, len(prompts[0]), False, f"{type(error).__name__}: {error}")]


def generate_summaries(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    articles: Sequence[str],
    settings: GenerationSettings,
    on_progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """One summary per article, in input order: greedy (or beam) decoding of at most `max_new_tokens`, the
    first line kept, the prompt never echoed. `on_progress(done, total)` is called after each batch. The time
    counts tokenizing and batch planning."""
    started = time.perf_counter()
    prompts = encode_prompts(tokenizer, settings.template, articles, settings.max_prompt_tokens)
    lengths = [len(p) for p in prompts]
    order = (sorted(range(len(prompts)), key=lengths.__getitem__) if settings.sort_by_length
             else list(range(len(prompts))))
    batches = _batches(model, lengths, order, settings)
    stop_ids = stop_token_ids(tokenizer, model)
    config = _generation_config(settings, stop_ids, tokenizer.pad_token_id)
    records: list[GenerationRecord | None] = [None] * len(prompts)
    batch_seconds: list[float] = []
    done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), speedups.for_generation(model, settings.speedups):
            for chosen in batches:
                batch_started = time.perf_counter()
                batch = _generate_or_isolate(model, tokenizer, [prompts[i] for i in chosen], config, stop_ids, settings)
                batch_seconds.append(time.perf_counter() - batch_started)  # its tokens are on the host: it is done
                for index, record in zip(chosen, batch, strict=True):
                    records[index] = record
                done += len(chosen)
                if on_progress:
                    on_progress(done, len(order))
    finally:
        model.train(was_training)
    return GenerationResult(records=list(records), seconds=time.perf_counter() - started,
                            batch_sizes=[len(b) for b in batches], batch_seconds=batch_seconds)


def _batches(model: PreTrainedModel, lengths: list[int], order: list[int],
             settings: GenerationSettings) -> list[list[int]]:
    """Prompt indices per generate call: fixed batches of `batch_size`, or with `batch_size: 0` on CUDA with
    speed-ups the batch planner's split."""
    if settings.batch_size == 0 and settings.speedups and model.device.type == "cuda":
        static = _decodes_statically(settings)
        return batch_planning.plan_batches(model, lengths, order, settings.max_new_tokens, settings.num_beams,
                                           chunked_prefill=static, graphed_steps=static and settings.cuda_graph)
    size = settings.batch_size or FIXED_BATCH
    return [order[start:start + size] for start in range(0, len(order), size)]


def load_merged_bf16(spec: models.ModelSpec, model_dir: str, adapter_path: str | Path | None,
                     speedups: bool = True) -> PreTrainedModel:
    """A separate dense copy of the base with the adapter merged into its weights: no LoRA matmuls and no 4-bit
    dequantisation per decoding step. Where the base trains in 4-bit, the copy is the NF4 weights dequantized to
    bf16, the very weights the adapter was trained against: closer to 4-bit + LoRA than a merge into the original
    bf16 checkpoint (docs/PERFORMANCE.md, "Merged bf16 evaluation"). With `speedups`, generation's kernels compile
    in the background meanwhile (`kernels_ahead`)."""
    precision = spec.precision()
    if speedups and precision.device == "cuda":
        kernels_ahead.start(AutoConfig.from_pretrained(model_dir), torch.bfloat16)
    model = models.load_model(spec, model_dir, precision)
    if precision.quantized_4bit:
        model = model.dequantize(dtype=torch.bfloat16)
    if adapter_path is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()
