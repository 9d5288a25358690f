"""Turning the ML core's figures and records into Dagster metadata values."""

from __future__ import annotations

import base64
import dataclasses
import typing
from collections.abc import Mapping

import dagster as dg
import datasets
import pandas as pd

from phi2_assets.ml.tokenization import TokenStats
from phi2_assets.ml.train import AdapterArtifact

# Floats in metadata keep this many decimals: enough for losses and ROUGE, short enough to read.
FIGURE_DECIMALS = 4
COLUMN_DESCRIPTIONS = {
    "id": "XSum article id (derived from the text where the source file had none)",
    "document": "the BBC article",
    "summary": "the reference one-sentence summary",
    "generated": "the model's summary: the first line of its output",
    "status": "ok (a non-empty summary), empty or error",
    "new_tokens": "tokens the model generated",
    "prompt_tokens": "tokens of the prompt (template and truncated article)",
    "hit_token_limit": "generation stopped at max_new_tokens",
    "error": "the error a failed generation raised",
    "input_ids": "prompt, summary and EOS token ids",
    "labels": "input_ids with the prompt masked (-100): loss on the summary only",
    "article_truncated": "the article was cut to fit max_length",
    "template": "prompt template name",
    "success_rate": "share of rows with status ok",
    "mean_words": "mean words per generated summary",
    "summaries_per_second": "generation throughput",
    "source": "generated here, or reused from baseline_summaries",
}


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """A plot in the asset's metadata: Dagster has no image type, so the PNG is embedded in Markdown."""
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table_markdown(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.to_markdown(index=False))


def flat_figures(prefix: str, figures: Mapping[str, object]) -> dict[str, object]:
    """`{"mean": 3.2}` under prefix `summary_words` becomes `{"summary_words_mean": 3.2}`."""
    return {f"{prefix}_{name}": value for name, value in figures.items()}


def _schema(types: Mapping[str, str]) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name=name, type=kind, description=COLUMN_DESCRIPTIONS.get(name)) for name, kind in types.items()
    ])


def _table(row_count: int, schema: dg.TableSchema) -> dict[str, object]:
    # the keys `dg.TableMetadataSet` writes; Dagster 1.13 keeps that class out of its public API, not the keys
    return {
        "dagster/row_count": dg.MetadataValue.int(row_count),
        "dagster/column_schema": dg.MetadataValue.table_schema(schema),
    }


def table_metadata(frame: pd.DataFrame) -> dict[str, object]:
    """`dagster/row_count` and `dagster/column_schema` of a stored DataFrame."""
    return _table(len(frame), _schema({str(column): str(dtype) for column, dtype in frame.dtypes.items()}))


def dataset_metadata(splits: datasets.DatasetDict) -> dict[str, object]:
    """`dagster/row_count` (sequences over all splits) and the column schema the splits share."""
    first = next(iter(splits.values()))
    schema = _schema({name: str(feature) for name, feature in first.features.items()})
    return _table(sum(len(split) for split in splits.values()), schema)


def record_figures(record: object, prefix: str = "") -> dict[str, object]:
    """A dataclass record's fields as metadata: numbers (floats rounded) and text as they are, lists of names
    joined; lists of numbers are series for plots and left out."""
    hints = typing.get_type_hints(type(record))
    figures = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, (list, tuple)):
            if typing.get_args(hints[field.name]) != (str,):
                continue
            value = ", ".join(value)
        elif isinstance(value, float):
            value = round(value, FIGURE_DECIMALS)
        figures[f"{prefix}{field.name}"] = value
    return figures


def adapter_metadata(artifact: AdapterArtifact, loss_curve: bytes) -> dict[str, object]:
    """Everything `lora_adapter` shows of its artifact: the record's figures, what follows from them, the loss curve."""
    return {
        **record_figures(artifact),
        "path": dg.MetadataValue.path(artifact.path),
        "trainable_share_percent": round(100 * artifact.trainable_share, 3),
        "perplexity": round(artifact.perplexity, 2),
        "base_perplexity": round(artifact.base_perplexity, 2),
        "train_minutes": round(artifact.train_seconds / 60, 2),
        "adapter_mb": round(artifact.adapter_bytes / 2**20, 2),
        "loss_curve": png_markdown(loss_curve, "loss curve"),
    }


def token_metadata(split: str, stats: TokenStats, dropped: int) -> dict[str, object]:
    """One split's token figures under `<split>_`, and how many rows were dropped because the summary could not fit."""
    return {**record_figures(stats, prefix=f"{split}_"), f"{split}_dropped_summary_too_long": dropped}
