"""The data graph materialized for real on the tiny profile."""

from phi2_assets.ml.sources import SPLITS
from phi2_assets_tests.conftest import check_results, materializations


def test_data_graph_materializes_with_checks(materialize):
    result = materialize("group:data")
    assert result.success
    metadata = materializations(result)
    for split in SPLITS:
        raw, cleaned = metadata[f"raw_xsum/{split}"], metadata[f"cleaned_xsum/{split}"]
        assert raw["rows"] > 0 and raw["document_words_p95"] >= raw["document_words_p50"]
        assert cleaned["rows_out"] <= cleaned["rows_in"]
        assert cleaned["length_histogram"].startswith("![length histogram](data:image/png;base64,")
    assert metadata["cleaned_xsum/train"]["rows_out"] == 48  # the tiny profile's cap
    tokenized = metadata["tokenized_xsum"]
    assert tokenized["train_max_length"] <= tokenized["max_length"] == 256
    assert tokenized["train_supervised_tokens"] > 0
    checks = check_results(result)
    assert len(checks) == 7 and all(checks.values()), checks


def test_tokenized_values_are_loadable_arrow(materialize, defs):
    materialize("group:data")
    from phi2_assets.io_managers import _load_dataset_dict
    from phi2_assets.profiles import data_dir

    tokenized = _load_dataset_dict(data_dir() / "assets" / "tokenized_xsum.arrow")
    assert set(tokenized) == {"train", "validation"}
    row = tokenized["train"][0]
    assert len(row["input_ids"]) == len(row["labels"])
    assert row["labels"][: row["prompt_tokens"]] == [-100] * row["prompt_tokens"]
