"""Turning the ML core's figures into Dagster metadata values."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import dagster as dg
import pandas as pd


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """A plot in the asset's metadata: Dagster has no image type, so the PNG is embedded in Markdown."""
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table_markdown(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.to_markdown(index=False))


def flat_figures(prefix: str, figures: Mapping[str, object]) -> dict[str, object]:
    """`{"mean": 3.2}` under prefix `summary_words` becomes `{"summary_words_mean": 3.2}`."""
    return {f"{prefix}_{name}": value for name, value in figures.items()}
