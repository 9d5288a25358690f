"""ROUGE F1 per sample with `rouge_score` (Porter stemming), means with 95% bootstrap intervals.

Empty or failed generations are scored as the empty string (F1 0): a model that says nothing is scored as
saying nothing, never dropped from the average the way the seed's report did.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from rouge_score import rouge_scorer

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# rougeLsum treats newlines as sentence boundaries; summaries arrive as plain text, so sentences are split here.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    mean: float
    low: float
    high: float


def _sentences_on_lines(text: str) -> str:
    return "\n".join(_SENTENCE_END.split(text.strip()))


def score_pairs(predictions: Sequence[str], references: Sequence[str]) -> pd.DataFrame:
    """One row per pair, one F1 column per ROUGE type, in input order."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_on_lines(reference), _sentences_on_lines(prediction or ""))
        rows.append({name: scores[name].fmeasure for name in ROUGE_TYPES})
    return pd.DataFrame(rows, columns=list(ROUGE_TYPES), dtype=float)


def bootstrap_interval(values: Sequence[float], resamples: int = 1_000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; a fixed seed makes the report reproducible."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize_scores(per_sample: pd.DataFrame, seed: int = 0) -> dict[str, MetricSummary]:
    """Mean and 95% bootstrap interval of each ROUGE type."""
    summaries = {}
    for name in ROUGE_TYPES:
        low, high = bootstrap_interval(per_sample[name], seed=seed)
        summaries[name] = MetricSummary(mean=float(per_sample[name].mean()) if len(per_sample) else 0.0, low=low,
                                        high=high)
    return summaries


def relative_improvement(baseline: float, finetuned: float) -> float | None:
    """(fine-tuned − baseline) / baseline; None when the baseline scored 0 (no ratio to speak of)."""
    if baseline == 0:
        return None
    return (finetuned - baseline) / baseline
