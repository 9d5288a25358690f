"""Cleaning XSum: normalised text, BBC boilerplate removed, bad and duplicate rows dropped, no leakage.

Text is handled line by line with str methods (split/join run in C); regular expressions only test the few
lines that could be boilerplate, so the full 226k-row corpus cleans in seconds.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

import pandas as pd

from phi2_assets.ml.sources import SPLITS

# Lines the BBC pages carry into XSum documents that say nothing about the story (matched on folded lines).
BOILERPLATE_LINE = re.compile(
    r"(?:"
    r"media playback is (?:not supported|unsupported) on (?:this|your) device"
    r"|find all the latest football transfers on our dedicated page\."
    r"|follow (?:@\w+|us) on (?:twitter|facebook|instagram)\b.*"
    r"|these are external links and will open in a new window"
    r"|(?:share this with|email|facebook|messenger|twitter|pinterest|whatsapp|linkedin|copy this link)"
    r"|report supplied by the press association\."
    r")$",
    flags=re.IGNORECASE,
)
_BOILERPLATE_FIRST_LETTERS = frozenset("mMfFtTsSeEwWlLcCpPrR")
# Video pages start with a dateline such as "20 July 2016 Last updated at 08:43 BST".
DATELINE = re.compile(r"\d{1,2} \w+ \d{4} Last updated at \d{1,2}:\d{2} (?:BST|GMT) ?")
# Evaluation splits win a leaked row: it is dropped from the split that trains on it.
LEAKAGE_PRIORITY: tuple[str, ...] = ("test", "validation", "train")
DROP_REASONS: tuple[str, ...] = (
    "empty_document", "empty_summary", "short_document", "short_summary", "long_document",
    "duplicate_id", "duplicate_document", "leaked_across_splits", "over_sample_cap",
)


@dataclasses.dataclass(frozen=True)
class CleaningSettings:
    """Rules for `clean_splits`; the caps are the seed's sample sizes (None keeps every row)."""

    min_document_words: int = 10
    min_summary_words: int = 3
    max_document_words: int = 10_000
    train_samples: int | None = 2_000
    validation_samples: int | None = 500
    test_samples: int | None = None

    def __post_init__(self) -> None:
        if self.min_document_words < 1 or self.min_summary_words < 1:
            raise ValueError("min_document_words and min_summary_words must be at least 1")
        if self.max_document_words <= self.min_document_words:
            raise ValueError("max_document_words must exceed min_document_words")
        for split in SPLITS:
            cap = self.cap(split)
            if cap is not None and cap < 1:
                raise ValueError(f"{split}_samples must be at least 1 (or null for every row), got {cap}")

    def cap(self, split: str) -> int | None:
        return getattr(self, f"{split}_samples")


@dataclasses.dataclass(frozen=True)
class CleanedSplits:
    frames: dict[str, pd.DataFrame]
    rows_in: dict[str, int]
    drops: dict[str, dict[str, int]]  # split -> reason -> rows dropped


def normalize_one(text: str | None) -> tuple[str, int]:
    """NFKC unicode, whitespace folded within lines, blank and boilerplate lines dropped, datelines cut; with
    the number of words left (counted from the same split, not a second pass)."""
    if not text:
        return "", 0
    kept, words = [], 0
    for line in unicodedata.normalize("NFKC", text).split("\n"):
        tokens = line.split()
        if not tokens:
            continue
        line = " ".join(tokens)
        if line[0] in _BOILERPLATE_FIRST_LETTERS and BOILERPLATE_LINE.match(line):
            continue
        if line[0].isdigit() and DATELINE.match(line):
            line = DATELINE.sub("", line, count=1)
            tokens = line.split()
        if tokens:
            kept.append(line)
            words += len(tokens)
    return "\n".join(kept), words


def normalize_text(texts: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Normalised texts and their word counts, aligned with `texts`."""
    pairs = [normalize_one(text if isinstance(text, str) else None) for text in texts.tolist()]
    return (
        pd.Series([text for text, _ in pairs], index=texts.index, dtype="string"),
        pd.Series([words for _, words in pairs], index=texts.index, dtype="int64"),
    )


def word_counts(texts: pd.Series) -> pd.Series:
    return pd.Series([len(text.split()) if isinstance(text, str) else 0 for text in texts.tolist()],
                     index=texts.index, dtype="int64")


def _drop(frame: pd.DataFrame, mask: pd.Series, reason: str, drops: dict[str, int]) -> pd.DataFrame:
    drops[reason] = drops.get(reason, 0) + int(mask.sum())
    return frame[~mask]


def _clean_one(frame: pd.DataFrame, settings: CleaningSettings, drops: dict[str, int]) -> pd.DataFrame:
    documents, document_words = normalize_text(frame["document"])
    summaries, summary_words = normalize_text(frame["summary"])
    frame = frame.assign(document=documents, summary=summaries)
    frame = _drop(frame, document_words == 0, "empty_document", drops)
    frame = _drop(frame, summary_words[frame.index] == 0, "empty_summary", drops)
    frame = _drop(frame, document_words[frame.index] < settings.min_document_words, "short_document", drops)
    frame = _drop(frame, summary_words[frame.index] < settings.min_summary_words, "short_summary", drops)
    frame = _drop(frame, document_words[frame.index] > settings.max_document_words, "long_document", drops)
    frame = _drop(frame, frame["id"].duplicated(), "duplicate_id", drops)
    return _drop(frame, frame["document"].duplicated(), "duplicate_document", drops)


def clean_splits(raw: dict[str, pd.DataFrame], settings: CleaningSettings) -> CleanedSplits:
    """Clean every split together: leakage can only be seen across splits."""
    drops = {split: {reason: 0 for reason in DROP_REASONS} for split in raw}
    cleaned = {split: _clean_one(frame, settings, drops[split]) for split, frame in raw.items()}
    seen_ids: set[str] = set()
    seen_documents: set[str] = set()
    for split in [s for s in LEAKAGE_PRIORITY if s in cleaned]:
        frame = cleaned[split]
        leaked = frame["id"].isin(seen_ids) | frame["document"].isin(seen_documents)
        frame = _drop(frame, leaked, "leaked_across_splits", drops[split])
        seen_ids.update(frame["id"])
        seen_documents.update(frame["document"])
        cap = settings.cap(split)
        if cap is not None and len(frame) > cap:
            drops[split]["over_sample_cap"] += len(frame) - cap
            frame = frame.head(cap)
        cleaned[split] = frame.reset_index(drop=True)
    return CleanedSplits(
        frames={split: cleaned[split] for split in raw},
        rows_in={split: len(frame) for split, frame in raw.items()},
        drops=drops,
    )


def audit_splits(frames: dict[str, pd.DataFrame]) -> dict[str, list[str]]:
    """What is wrong with cleaned splits, per split: no rows, empty text, duplicate ids, ids shared with another
    split."""
    problems: dict[str, list[str]] = {}
    ids = {split: set(frame["id"]) for split, frame in frames.items()}
    for split, frame in frames.items():
        found = [] if len(frame) else ["no rows"]
        for column in ("document", "summary"):
            empty = int(frame[column].fillna("").str.strip().eq("").sum())
            if empty:
                found.append(f"{empty} empty {column} values")
        duplicated = int(frame["id"].duplicated().sum())
        if duplicated:
            found.append(f"{duplicated} duplicate ids")
        others = set().union(*(ids[name] for name in ids if name != split))
        leaked = int(frame["id"].isin(others).sum())
        if leaked:
            found.append(f"{leaked} ids also in another split")
        problems[split] = found
    return problems
