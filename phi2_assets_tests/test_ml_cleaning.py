"""Each cleaning rule on hand-made rows."""

import pandas as pd

from phi2_assets.ml.cleaning import CleaningSettings, audit_splits, clean_splits, normalize_text

DOC = "The council in Leeds voted on Tuesday to close three libraries after a long consultation process."
SUMMARY = "Leeds council has voted to close three libraries."
NO_CAPS = CleaningSettings(train_samples=None, validation_samples=None, test_samples=None)


def frame(*rows):
    return pd.DataFrame([{"id": r[0], "document": r[1], "summary": r[2]} for r in rows],
                        columns=["id", "document", "summary"]).astype("string")


def splits(train=(), validation=(), test=()):
    return {"train": frame(*train), "validation": frame(*validation), "test": frame(*test)}


def test_normalize_unicode_whitespace_and_boilerplate():
    text = ("Media playback is not supported on this device\n"
            "The  ﬁrst\u00a0line.\n\n\n  Second line.  \nShare this with\n")
    texts, words = normalize_text(pd.Series([text, "20 July 2016 Last updated at 08:43 BST Better education", None]))
    assert texts.tolist() == ["The first line.\nSecond line.", "Better education", ""]
    assert words.tolist() == [5, 2, 0]


def test_drop_reasons_are_counted():
    rows = [
        ("ok", DOC, SUMMARY),
        ("empty-doc", "Media playback is unsupported on your device", SUMMARY),
        ("empty-sum", DOC + " x", "   "),
        ("short-doc", "Too short to summarise.", SUMMARY),
        ("short-sum", DOC + " y", "Closed."),
        ("long-doc", "word " * 10_001, SUMMARY),
        ("ok", DOC + " again", SUMMARY),
        ("dup-doc", DOC, SUMMARY),
    ]
    result = clean_splits(
        splits(train=rows, validation=[("v", DOC + " v", SUMMARY)], test=[("t", DOC + " t", SUMMARY)]), NO_CAPS)
    drops = result.drops["train"]
    assert {k: v for k, v in drops.items() if v} == {
        "empty_document": 1, "empty_summary": 1, "short_document": 1, "short_summary": 1,
        "long_document": 1, "duplicate_id": 1, "duplicate_document": 1,
    }
    assert result.frames["train"]["id"].tolist() == ["ok"]
    assert result.rows_in["train"] == len(rows)


def test_leakage_is_dropped_from_the_training_side():
    result = clean_splits(
        splits(train=[("shared", DOC, SUMMARY), ("same-doc", DOC + " t", SUMMARY)],
               validation=[("v", DOC + " v", SUMMARY)],
               test=[("shared", DOC + " other", SUMMARY), ("t", DOC + " t", SUMMARY)]),
        NO_CAPS,
    )
    assert result.frames["train"].empty
    assert result.drops["train"]["leaked_across_splits"] == 2
    assert result.frames["test"]["id"].tolist() == ["shared", "t"]


def test_sample_caps_keep_the_first_rows():
    rows = [(str(i), f"{DOC} number {i}", SUMMARY) for i in range(10)]
    result = clean_splits(splits(train=rows, validation=rows[:1], test=[("t", DOC + " t", SUMMARY)]),
                          CleaningSettings(train_samples=4, validation_samples=None, test_samples=None))
    assert result.frames["train"]["id"].tolist() == ["1", "2", "3", "4"]  # "0" leaked into validation
    assert result.drops["train"]["over_sample_cap"] == 5


def test_null_summary_and_huge_document_are_documented_drops():
    rows = frame(("null", DOC, None), ("huge", "word " * 100_000, SUMMARY), ("ok", DOC, SUMMARY))
    result = clean_splits({"train": rows, "validation": frame(), "test": frame()}, NO_CAPS)
    assert result.frames["train"]["id"].tolist() == ["ok"]
    assert result.drops["train"]["empty_summary"] == 1 and result.drops["train"]["long_document"] == 1


def test_audit_names_empty_text_duplicates_and_leaks():
    frames = {
        "train": frame(("a", DOC, SUMMARY), ("a", DOC + " b", " ")),
        "validation": frame(("a", DOC + " c", SUMMARY)),
        "test": frame(),
    }
    problems = audit_splits(frames)
    assert problems["train"] == ["1 empty summary values", "1 duplicate ids", "2 ids also in another split"]
    assert problems["validation"] == ["1 ids also in another split"] and problems["test"] == ["no rows"]
    assert audit_splits(clean_splits(frames, NO_CAPS).frames)["validation"] == []
