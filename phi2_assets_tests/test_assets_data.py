"""The data graph materialized for real on the tiny profile."""

import dagster as dg

from phi2_assets.assets.data import raw_key
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

    tokenized = _load_dataset_dict(data_dir() / "assets" / "tokenized_xsum.arrow")
    assert set(tokenized) == {"train", "validation"}
    row = tokenized["train"][0]
    assert len(row["input_ids"]) == len(row["labels"])
    assert row["labels"][: row["prompt_tokens"]] == [-100] * row["prompt_tokens"]


def test_user_xsum_dir_with_a_bad_line_fails_cleanly_and_keeps_the_last_value(defs, instance, materialize, tmp_path):
    raw_only = dg.AssetSelection.keys(*(raw_key(split) for split in SPLITS))
    materialize(raw_only)  # a good value exists first
    stored = data_dir() / "assets" / "raw_xsum" / "train.parquet"
    before = stored.read_bytes()
    good = '{"id": "1", "document": "A council in Leeds met.", "summary": "It met."}\n'
    (tmp_path / "train.jsonl").write_text(good + '{"id": "2", "document": "broken\n')
    for split in ("validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text(good.replace('"1"', f'"{split}"'))
    resources = {**defs.resources, "xsum_source": XsumSource(kind="dir", directory=str(tmp_path))}
    result = dg.materialize([*defs.assets], selection=raw_only, resources=resources, instance=instance, raise_on_error=False)
    failure = result.failure_data_for_node("raw_xsum")
    assert not result.success and failure.user_failure_data.metadata["error"].value == "XsumInputError"
    assert f"{tmp_path / 'train.jsonl'}, line 2: malformed JSON" in failure.user_failure_data.description
    assert len([e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]) == 0
    assert stored.read_bytes() == before
    assert not list(stored.parent.glob(".*.tmp"))
