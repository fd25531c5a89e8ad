"""Rows of CSV, TSV and JSON-lines files: checked in one streamed pass, then read by position.

`scan` reads every row once and keeps only where each usable row lies in its file and its
label's value, so a file never has to fit in memory; `read_texts` reads the texts of the
rows asked for, in that order, by seeking to each. Bytes that are not UTF-8 are replaced.
Every problem is a `TableError` of one line that names the file (and the line). No
TensorFlow here: `pipeline.data` turns tables into datasets.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
BOM = b"\xef\xbb\xbf"  # spreadsheet exports often start with one; it is not part of the header
SHOWN = 6  # label values an error names, at most


class TableError(PipelineError):
    """A table file that cannot be used as it is; the message names the file and what to fix."""


@dataclass(frozen=True)
class Table:
    """Where each usable row of some files lies, and the value of its label (if it has one)."""

    paths: tuple[Path, ...]
    fields: tuple[int | str, ...]  # per file: the text column's index (CSV, TSV) or key (JSONL)
    file: np.ndarray  # int32 per row: index into paths
    start: np.ndarray  # int64 per row: byte offset of the row in its file
    end: np.ndarray  # int64 per row: byte offset just past it
    values: tuple[str, ...]  # the distinct label values, in order of first appearance
    codes: np.ndarray  # int32 per row: index into values (-1 without a label column)

    def __len__(self) -> int:
        return len(self.start)

    def label_counts(self) -> dict[str, int]:
        """Rows per label value, most frequent first."""
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(self.values))
        return dict(sorted(zip(self.values, counts.tolist(), strict=True), key=lambda kv: -kv[1]))


def file_format(path: Path) -> str:
    """csv, tsv or jsonl, from the file's extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TableError(f"{path}: cannot tell the format from the extension {path.suffix!r}: "
                         "name it .csv, .tsv or .jsonl (one JSON object per line)")
    return fmt


def expand(pattern: str, key: str) -> list[Path]:
    """The files that a path or glob (`data.<key>`) names, in sorted order; none is an error."""
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise TableError(f"data.{key}: no file matches {pattern!r}")
    else:
        path = Path(pattern)
        if not path.exists():
            raise TableError(f"data.{key}: {pattern!r} does not exist")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise TableError(f"data.{key}: {pattern!r} is not a readable file")
        paths = [path]
    for path in paths:
        file_format(path)
    return paths


class _Lines:
    """A binary file's lines as text (bad bytes replaced), counting the bytes and lines read.

    csv.reader pulls one line at a time and never reads ahead, so `pos` before a row is
    where that row starts.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self.start = 0  # where the line last returned starts
        self.pos = 0
        self.lineno = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self._f.readline()
        if not raw:
            raise StopIteration
        text = raw[len(BOM):] if self.pos == 0 and raw.startswith(BOM) else raw
        self.start = self.pos
        self.pos += len(raw)
        self.lineno += 1
        return text.decode("utf-8", "replace")


def _csv_problem(path: Path, line: int, exc: csv.Error) -> TableError:
    why = str(exc)
    if "unexpected end of data" in why:
        why = "unbalanced quotes: the quoted field that starts here is never closed"
    elif "field larger than field limit" in why:
        why = (f"a field runs past {csv.field_size_limit()} characters: unbalanced quotes "
               "(a quoted field that is never closed)?")
    else:
        why = f"malformed CSV ({why}): a quote inside a quoted field must be doubled"
    return TableError(f"{path}: line {line}: {why}")


def _records(path: Path, fmt: str) -> Iterator[tuple[int, int, int, list[str] | dict]]:
    """(line, start, end, record) per non-blank record: a list of fields, or a JSON object."""
    with path.open("rb") as f:
        lines = _Lines(f)
        if fmt == "jsonl":
            for text in lines:
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise TableError(f"{path}: line {lines.lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise TableError(f"{path}: line {lines.lineno}: a JSON {type(record).__name__} "
                                     "where an object was expected (one object per line)")
                yield lines.lineno, lines.start, lines.pos, record
            return
        reader = csv.reader(lines, delimiter=DELIMITERS[fmt], strict=True)
        while True:
            start, line = lines.pos, lines.lineno + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _csv_problem(path, line, exc) from None
            if row:  # not a blank line
                yield line, start, lines.pos, row


def _value(record: list[str] | dict, field: int | str) -> str:
    """A field as text: a missing field, null and whitespace alone are all empty."""
    if isinstance(record, list):
        value = record[field] if isinstance(field, int) and field < len(record) else ""
    else:
        value = record.get(field)
        if isinstance(value, bool):  # JSON spells them true/false, Python True/False
            value = "true" if value else "false"
        value = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    return value.strip()


def _field(path: Path, fmt: str, header: list[str] | dict, name: str, key: str) -> int | str:
    """Where column `name` is in this file: its index (CSV, TSV) or its key (JSONL)."""
    found = [h.strip() for h in header] if isinstance(header, list) else list(header)
    if name not in found:
        what = "keys" if fmt == "jsonl" else "columns"
        raise TableError(f"{path}: no column {name!r} ({what} found: {', '.join(map(repr, found))}); "
                         f"set data.{key}")
    return found.index(name) if isinstance(header, list) else name


def check_columns(paths: list[Path], text_column: str) -> None:
    """That each file has a first record with the text column: a quick look, not a full read."""
    for path in paths:
        fmt = file_format(path)
        first = next(_records(path, fmt), None)
        if first is None:
            raise TableError(f"{path}: no rows")
        _field(path, fmt, first[3], text_column, "text_column")


def scan(paths: list[Path], text_column: str, label_column: str | None, skip_bad_rows: bool,
         key: str) -> Table:
    """Read every row of `paths` (`data.<key>`) once, keeping where the usable ones lie.

    A row with an empty text or label is an error, or skipped (and counted in the log)
    with `skip_bad_rows`; a file without rows is an error either way.
    """
    files, starts, ends, codes = [], [], [], []
    fields: list[int | str] = []
    values: dict[str, int] = {}
    empty_text, empty_label, first_bad = 0, 0, ""
    for index, path in enumerate(paths):
        fmt = file_format(path)
        records = _records(path, fmt)
        header = None if fmt == "jsonl" else next(records, (0, 0, 0, None))[3]
        rows = 0
        for line, start, end, record in records:
            if header is None:  # JSONL: the first object names the keys
                header = record
            if rows == 0:
                text_field = _field(path, fmt, header, text_column, "text_column")
                fields.append(text_field)
                label_field = (_field(path, fmt, header, label_column, "label_column")
                               if label_column is not None else None)
            rows += 1
            has_text = bool(_value(record, text_field))
            label = _value(record, label_field) if label_field is not None else None
            if not has_text or label == "":
                empty_text, empty_label = empty_text + (not has_text), empty_label + (label == "")
                first_bad = first_bad or f"{path} line {line}"
                continue
            files.append(index)
            starts.append(start)
            ends.append(end)
            codes.append(values.setdefault(label, len(values)) if label is not None else -1)
        if rows == 0:
            raise TableError(f"{path}: no rows" + (" (only a header)" if header else ""))
    bad = empty_text + empty_label
    if bad:
        what = (f"{empty_text} row(s) with an empty {text_column!r}" if empty_text else "") + (
            " and " if empty_text and empty_label else "") + (
            f"{empty_label} row(s) with an empty {label_column!r}" if empty_label else "")
        if not skip_bad_rows:
            raise TableError(f"data.{key}: {what} (the first: {first_bad}): fix them, or set "
                             "data.skip_bad_rows: true to skip them")
        log.warning("data.%s: skipped %s (the first: %s)", key, what, first_bad)
        if not starts:
            raise TableError(f"data.{key}: no usable rows: {what}")
    return Table(tuple(paths), tuple(fields), np.array(files, np.int32), np.array(starts, np.int64),
                 np.array(ends, np.int64), tuple(values), np.array(codes, np.int32))


def _order(value: str) -> tuple:
    # Integers in numeric order (-1 before 1, 2 before 10), then text in alphabetical order.
    return (0, int(value), "") if re.fullmatch(r"[+-]?\d+", value) else (1, 0, value)


def _listed(counts: dict[str, int]) -> str:
    shown = [f"{v!r}: {n}" for v, n in list(counts.items())[:SHOWN]]
    more = len(counts) - SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def class_names(table: Table, given: tuple[str, str] | None, label_column: str, key: str
                ) -> tuple[str, str]:
    """(negative, positive): `given` (data.labels), or the two values found, in sorted order.

    Exactly two classes: one, or more than two, is an error that names them with their counts.
    """
    counts = table.label_counts()
    if given is not None:
        unknown = {v: n for v, n in counts.items() if v not in given}
        if unknown:
            raise TableError(f"data.{key}: the label column {label_column!r} holds {_listed(unknown)} "
                             f"(rows), not one of data.labels {list(given)}")
    if len(counts) != 2:
        more = "; multi-class is not supported yet" if len(counts) > 2 else ""
        raise TableError(f"data.{key}: the label column {label_column!r} has {len(counts)} "
                         f"class(es) ({_listed(counts)} rows): exactly two are needed{more}")
    if given is not None:
        return given
    negative, positive = sorted(counts, key=_order)
    return negative, positive


def binary_labels(table: Table, names: tuple[str, str], key: str) -> np.ndarray:
    """int64 labels, 1 for the positive name; a value that is neither name is an error."""
    index = {name: i for i, name in enumerate(names)}
    unknown = [v for v in table.values if v not in index]
    if unknown:
        counts = {v: n for v, n in table.label_counts().items() if v in unknown}
        raise TableError(f"data.{key}: labels {_listed(counts)} (rows) are not among the "
                         f"training labels {list(names)}")
    lookup = np.array([index[v] for v in table.values], dtype=np.int64)
    return lookup[table.codes]


def read_texts(table: Table, rows: np.ndarray) -> Iterator[str]:
    """The texts of `rows` (indices into `table`), in that order, each read from its offset."""
    handles: dict[int, BinaryIO] = {}
    formats = [file_format(p) for p in table.paths]
    try:
        for row in rows:
            i = int(table.file[row])
            if i not in handles:
                handles[i] = table.paths[i].open("rb")
            f = handles[i]
            f.seek(int(table.start[row]))
            chunk = f.read(int(table.end[row] - table.start[row])).removeprefix(BOM)
            text = chunk.decode("utf-8", "replace")
            if formats[i] == "jsonl":
                record: list[str] | dict = json.loads(text)
            else:
                record = next(csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITERS[formats[i]]))
            yield _value(record, table.fields[i])
    finally:
        for f in handles.values():
            f.close()


def stream_texts(paths: list[Path], text_column: str) -> Iterator[str]:
    """The non-empty texts of every row of `paths`, in file order: unlabelled rows for pretraining."""
    for path in paths:
        fmt = file_format(path)
        records = _records(path, fmt)
        header = None if fmt == "jsonl" else next(records, (0, 0, 0, None))[3]
        field: int | str | None = None
        for _, _, _, record in records:
            if field is None:
                field = _field(path, fmt, header if header is not None else record, text_column,
                               "text_column")
            text = _value(record, field)
            if text:
                yield text


_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime): content hash, per process


def content_digest(paths: list[Path]) -> str:
    """A hash of the files' contents in order: what the data is, wherever it lies.

    Memoized on each file's size and modification time, so one process hashes a file once
    however many caches ask.
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _digests:
            with path.open("rb") as f:
                _digests[memo] = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(_digests[memo].encode() + b"\n")
    return digest.hexdigest()[:16]


def read_column(table: Table, column: str, key: str) -> Iterator[str]:
    """The values of another column (`data.<key>`) of every row of `table`, in order; a row
    without it gives "". A file without that column is an error naming the columns it has."""
    fields = []
    for path in table.paths:
        fmt = file_format(path)
        header = next(_records(path, fmt))[3]  # CSV, TSV: the header row; JSONL: the first object
        fields.append(_field(path, fmt, header, column, key))
    yield from read_texts(dataclasses.replace(table, fields=tuple(fields)), np.arange(len(table)))
