"""Descriptive figures for data frames: what a reviewer reads in metadata instead of opening files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from phi2_assets.ml.cleaning import word_counts


def distribution(values: np.ndarray | pd.Series) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    return {
        "mean": round(float(values.mean()), 1),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def text_profile(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Words per document and per summary: mean, p50, p95, max."""
    return {column: distribution(word_counts(frame[column])) for column in ("document", "summary")}


def xsum_eda(frame: pd.DataFrame) -> dict[str, float]:
    """The figures the seed's exploration notebook printed: lengths, compression, and how abstractive summaries are."""
    documents, summaries = word_counts(frame["document"]), word_counts(frame["summary"])
    novel = [_novel_unigram_share(d, s) for d, s in zip(frame["document"], frame["summary"], strict=True)]
    return {
        "rows": float(len(frame)),
        "mean_document_words": round(float(documents.mean()), 1) if len(frame) else 0.0,
        "mean_summary_words": round(float(summaries.mean()), 1) if len(frame) else 0.0,
        "compression_ratio": round(float((documents / summaries.clip(lower=1)).mean()), 1) if len(frame) else 0.0,
        "summary_novel_unigram_share": round(float(np.mean(novel)), 3) if novel else 0.0,
        "mean_document_sentences": (
            round(float(frame["document"].str.count("\n").add(1).mean()), 1) if len(frame) else 0.0
        ),
    }


def _novel_unigram_share(document: str, summary: str) -> float:
    words = summary.lower().split()
    if not words:
        return 0.0
    seen = set(document.lower().split())
    return sum(word not in seen for word in words) / len(words)


def preview(frame: pd.DataFrame, rows: int = 5, width: int = 120) -> pd.DataFrame:
    """The first rows with long text cut, for a metadata preview table."""
    head = frame.head(rows).copy()
    for column in head.columns:
        if head[column].dtype == object or str(head[column].dtype) == "string":
            head[column] = head[column].astype(str).str.replace("\n", " ").str.slice(0, width)
    return head
