"""Documents from local files: plain text, JSONL and Parquet, read by index.

`DocumentSource` is a random-access source (`len`, `source[i] -> str`) that grain
reads from. It indexes the files once (one document per text file, per JSONL
line, per Parquet row) and reads a document only when it is asked for.

With no files the corpus is the Python standard library source: every Python
install carries it (`sysconfig.get_paths()["stdlib"]`, about 1,700 `.py` files,
30 MB), so a recipe runs on a fresh machine without a data set.
"""

from __future__ import annotations

import functools
import glob
import json
import sysconfig
from pathlib import Path

import numpy as np

from flaxlm.model.errors import FlaxlmError

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                     ".parquet": "parquet"}


class DataError(FlaxlmError, ValueError):
    """A data file is missing, empty or unreadable."""


def default_corpus() -> list[Path]:
    """The non-empty `.py` files of the Python standard library, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(p.parts) and p.stat().st_size > 0]
    if not files:
        raise DataError(f"no .py files under {root}: the default corpus needs the Python stdlib source")
    return sorted(files)


def find_files(patterns: tuple[str, ...]) -> list[Path]:
    """The files the glob patterns match (`**` recurses), sorted; every pattern must match a file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(m) for m in glob.glob(str(Path(pattern).expanduser()), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data.files: no file matches {pattern!r}")
        files += matches
    return list(dict.fromkeys(files))


def file_format(path: Path, fmt: str) -> str:
    return FORMATS_BY_SUFFIX.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


class DocumentSource:
    """Documents of `files` by index: `source[i]` is the text of document i."""

    def __init__(self, files: list[Path], fmt: str = "auto", text_field: str = "text",
                 skip_empty: bool = False):
        if not files:
            raise DataError("no data files")
        self.files = files
        self.formats = [file_format(f, fmt) for f in files]
        self.text_field = text_field
        file_ids, keys = [], []
        for index, (path, kind) in enumerate(zip(files, self.formats)):
            records = _index_file(path, kind, text_field)
            if len(records) == 0 and not skip_empty:
                raise DataError(f"{path}: empty, no documents")
            file_ids.append(np.full(len(records), index, np.int32))
            keys.append(records)
        self._file_ids = np.concatenate(file_ids)
        self._keys = np.concatenate(keys)
        if len(self) == 0:
            raise DataError("the data files hold no documents")

    def __len__(self) -> int:
        return len(self._file_ids)

    def __getitem__(self, index: int) -> str:
        file_id, key = int(self._file_ids[index]), int(self._keys[index])
        path, kind = self.files[file_id], self.formats[file_id]
        if kind == "text":
            return _read_text(path)
        if kind == "jsonl":
            return _read_jsonl(path, key, self.text_field)
        return _read_parquet(path, key, self.text_field)

    def __repr__(self) -> str:
        return f"DocumentSource({len(self)} documents in {len(self.files)} files)"


def _index_file(path: Path, kind: str, text_field: str) -> np.ndarray:
    """Keys of the documents in one file: [0] for a text file, line offsets for
    JSONL, row numbers for Parquet; empty when the file holds none."""
    try:
        if kind == "text":
            return np.zeros(1 if path.stat().st_size > 0 else 0, np.int64)
        if kind == "jsonl":
            return _index_jsonl(path, text_field)
        return _index_parquet(path, text_field)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _index_jsonl(path: Path, text_field: str) -> np.ndarray:
    """Byte offsets of the non-empty lines; the first record is parsed to check `text_field`."""
    data = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(data)]])
    offsets = starts[ends - starts > 0].astype(np.int64)
    if len(offsets):
        _read_jsonl(path, int(offsets[0]), text_field)
    return offsets


def _read_jsonl(path: Path, offset: int, text_field: str) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.readline()
    where = f"{path} (record at byte {offset})"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: no string field {text_field!r} (set data.text_field)")
    return record[text_field]


@functools.lru_cache(maxsize=64)
def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def _index_parquet(path: Path, text_field: str) -> np.ndarray:
    parquet = _parquet_file(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        "set data.text_field")
    return np.arange(parquet.metadata.num_rows, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _parquet_row_group(path: Path, group: int, text_field: str) -> list:
    return _parquet_file(path).read_row_group(group, columns=[text_field]).column(0).to_pylist()


def _read_parquet(path: Path, row: int, text_field: str) -> str:
    metadata = _parquet_file(path).metadata
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if row < first + rows:
            text = _parquet_row_group(path, group, text_field)[row - first]
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row} of column {text_field!r} is not a string")
            return text
        first += rows
    raise DataError(f"{path}: no row {row}")
