"""The data graph materialized for real on the tiny profile."""

import dagster as dg
import pandas as pd

from phi2_assets.assets.data import cleaned_key, raw_key
from phi2_assets.io_managers import _load_dataset_dict
from phi2_assets.ml.sources import SPLITS
from phi2_assets.profiles import data_dir
from phi2_assets.resources import XsumSource
from phi2_assets_tests.conftest import check_results, materializations


def test_data_graph_materializes_with_checks_and_arrow_values(materialize):
    result = materialize("group:data")
    assert result.success
    metadata = materializations(result)
    for split in SPLITS:
        raw, cleaned = metadata[f"raw_xsum_{split}"], metadata[f"cleaned_xsum_{split}"]
        assert raw["dagster/row_count"] > 0 and raw["document_words_p95"] >= raw["document_words_p50"]
        assert cleaned["rows_out"] == cleaned["dagster/row_count"] <= cleaned["rows_in"]
        assert cleaned["length_histogram"].startswith("![length histogram](data:image/png;base64,")
        for table in (raw, cleaned):
            columns = {column.name: column for column in table["dagster/column_schema"].columns}
            assert list(columns) == ["id", "document", "summary"] and columns["summary"].description
    assert metadata["cleaned_xsum_train"]["rows_out"] == 48  # the tiny profile's cap
    tokenized = metadata["tokenized_xsum"]
    assert tokenized["train_max_length"] <= tokenized["max_length"] == 256
    assert tokenized["train_supervised_tokens"] > 0 and 0 <= tokenized["train_article_truncated_share"] <= 1
    assert tokenized["dagster/row_count"] == tokenized["train_sequences"] + tokenized["validation_sequences"]
    assert {c.name for c in tokenized["dagster/column_schema"].columns} >= {"input_ids", "labels", "prompt_tokens"}
    checks = check_results(result)
    assert len(checks) == 7 and all(checks.values()), checks

    tokenized = _load_dataset_dict(data_dir() / "assets" / "tokenized_xsum.arrow")
    assert set(tokenized) == {"train", "validation"}
    row = tokenized["train"][0]
    assert len(row["input_ids"]) == len(row["labels"])
    assert row["labels"][: row["prompt_tokens"]] == [-100] * row["prompt_tokens"]


def test_user_xsum_dir_with_a_bad_line_fails_cleanly_and_keeps_the_last_value(defs, instance, materialize, tmp_path):
    raw_only = dg.AssetSelection.keys(*(raw_key(split) for split in SPLITS))
    materialize(raw_only)  # a good value exists first
    stored = data_dir() / "assets" / "raw_xsum_train.parquet"
    before = stored.read_bytes()
    good = '{"id": "1", "document": "A council in Leeds met.", "summary": "It met."}\n'
    (tmp_path / "train.jsonl").write_text(good + '{"id": "2", "document": "broken\n')
    for split in ("validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text(good.replace('"1"', f'"{split}"'))
    resources = {**defs.resources, "xsum_source": XsumSource(kind="dir", directory=str(tmp_path))}
    result = dg.materialize(
        [*defs.assets], selection=raw_only, resources=resources, instance=instance, raise_on_error=False
    )
    failure = result.failure_data_for_node("raw_xsum")
    assert not result.success and failure.user_failure_data.metadata["error"].value == "XsumInputError"
    assert f"{tmp_path / 'train.jsonl'}, line 2: malformed JSON" in failure.user_failure_data.description
    assert len([e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]) == 0
    assert stored.read_bytes() == before
    assert not list(stored.parent.glob(".*.tmp"))


def test_spreadsheet_csv_dir_materializes(defs, instance, tmp_path):
    """CSV files as a spreadsheet saves them (byte-order mark, CRLF, quoted multi-line cells, no id column)."""
    document = "The council met on Monday.\r\nIt voted to keep the library open, by 7 votes to 2."
    for split in SPLITS:
        rows = "".join(f'"{document} ({split} {n})","The library stays open.",{n}\r\n' for n in range(3))
        (tmp_path / f"{split}.csv").write_bytes(("\ufeffdocument,summary,votes\r\n" + rows).encode())
    resources = {**defs.resources, "xsum_source": XsumSource(kind="dir", directory=str(tmp_path))}
    selection = dg.AssetSelection.keys(*(raw_key(split) for split in SPLITS), *(cleaned_key(split) for split in SPLITS))
    result = dg.materialize([*defs.assets], selection=selection, resources=resources, instance=instance)
    raw = pd.read_parquet(data_dir() / "assets" / "raw_xsum_test.parquet")
    # the profile's sample again, for the tests that read the stored data after this one
    dg.materialize([*defs.assets], selection=selection, resources=defs.resources, instance=instance)
    assert result.success
    assert materializations(result)["raw_xsum_test"]["dagster/row_count"] == 3
    assert list(raw.columns) == ["id", "document", "summary"] and raw["id"].str.startswith("sha1-").all()
    assert raw["document"][0] == document.replace("\r\n", "\n") + " (test 0)"
