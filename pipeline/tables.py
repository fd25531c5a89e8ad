"""Rows of CSV, TSV and JSON-lines files (plain or gzipped): checked in one streamed pass, then
read by position.

`scan` reads every row once and keeps only where each usable row lies in its file and its
label's value, so a file never has to fit in memory; `read_texts` reads the texts of the
rows asked for, in that order, by seeking to each. A gzipped file is decompressed once, to
a temporary file that lives as long as the process, since rows are read by seeking.

Nothing is cut or dropped without a word: a row with more fields than its header, an
empty text or label, a file that is not UTF-8 text are each an error or, where the user
asks (`skip_bad_rows`) or the bytes are merely not UTF-8, counted and logged. Every problem
is a `TableError` of one line that names the file (and the line). No TensorFlow here:
`pipeline.data` turns tables into datasets.
"""

from __future__ import annotations

import atexit
import codecs
import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon"}
BOM = codecs.BOM_UTF8  # spreadsheet exports often start with one; it is not part of the header
SHOWN = 6  # label values an error names, at most
SHOWN_CHARS = 40  # of each value: a text shifted into the label column can be long
HEAD_BYTES = 1 << 16  # what is looked at for the encoding and the line endings
# Python's csv refuses fields past 131,072 characters by default; a long review is valid, so
# the limit is only a guard against a quote that is never closed swallowing the whole file.
FIELD_LIMIT = 1 << 28
csv.field_size_limit(FIELD_LIMIT)

# Why a row was skipped (skip_bad_rows), as the summary and the errors say it.
EMPTY_TEXT, EMPTY_LABEL, EXTRA_FIELDS = "empty text", "empty label", "more fields than the header"


class TableError(PipelineError):
    """A table file that cannot be used as it is; the message names the file and what to fix."""


@dataclass(frozen=True)
class Table:
    """Where each usable row of some files lies, the value of its label (if it has one), and
    what the scan counted on the way."""

    paths: tuple[Path, ...]  # as the user named them
    plain: tuple[Path, ...]  # per file: where its rows are read (a gzipped file's copy)
    delimiters: tuple[str, ...]  # per file: the CSV/TSV delimiter, "" for JSONL
    fields: tuple[int | str, ...]  # per file: the text column's index (CSV, TSV) or key (JSONL)
    file: np.ndarray  # int32 per row: index into paths
    start: np.ndarray  # int64 per row: byte offset of the row in its (plain) file
    end: np.ndarray  # int64 per row: byte offset just past it
    values: tuple[str, ...]  # the distinct label values, in order of first appearance
    codes: np.ndarray  # int32 per row: index into values (-1 without a label column)
    first_seen: tuple[str, ...] = ()  # per value: "file line N" where it first appears
    rows_read: int = 0  # rows in the files, usable or not
    skipped: dict[str, int] = field(default_factory=dict)  # rows skipped, by reason

    def __len__(self) -> int:
        return len(self.start)

    def label_counts(self) -> dict[str, int]:
        """Rows per label value, most frequent first."""
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(self.values))
        return dict(sorted(zip(self.values, counts.tolist(), strict=True), key=lambda kv: -kv[1]))


def file_format(path: Path) -> str:
    """csv, tsv or jsonl, from the file's extension (before a `.gz`)."""
    name = path.name.lower().removesuffix(".gz")
    fmt = FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise TableError(f"{path}: cannot tell the format from the extension {''.join(path.suffixes)!r}: "
                         "name it .csv, .tsv or .jsonl (one JSON object per line), gzipped or not (.csv.gz)")
    return fmt


def _readable(path: Path, key: str) -> None:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise TableError(f"data.{key}: {str(path)!r} is not a readable file: fix its permissions "
                         "or leave it out")


def expand(pattern: str, key: str) -> list[Path]:
    """The files that a path or glob (`data.<key>`) names, in sorted order; none is an error,
    and so is one that cannot be read."""
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
        # Folders are passed over; anything else that matches (a broken link) must be readable.
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir())
        if not paths:
            raise TableError(f"data.{key}: no file matches {pattern!r}")
    else:
        paths = [Path(pattern)]
        if not paths[0].exists():
            raise TableError(f"data.{key}: {pattern!r} does not exist")
    for path in paths:
        _readable(path, key)
        file_format(path)
    return paths


# --- opening a file: gzip, encoding, line endings ------------------------------------------------

_unzipped: dict[tuple[str, int, int], Path] = {}  # (path, size, mtime): its decompressed copy
_unzip_dir: list[Path] = []


def _scratch() -> Path:
    if not _unzip_dir:
        folder = Path(tempfile.mkdtemp(prefix="imdb-pipeline-gunzip-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _unzip_dir.append(folder)
    return _unzip_dir[0]


def plain_path(path: Path) -> Path:
    """`path` itself, or for a `.gz` file a decompressed copy (made once per process)."""
    if path.suffix.lower() != ".gz":
        return path
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _unzipped:
        target = _scratch() / f"{len(_unzipped)}-{path.name[:-3]}"
        try:
            with gzip.open(path, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError, zlib.error) as exc:
            target.unlink(missing_ok=True)
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                   else str(exc) or type(exc).__name__)
            raise TableError(f"{path}: cannot decompress it ({why}): is it a whole gzip file?") from None
        _unzipped[memo] = target
    return _unzipped[memo]


def _check_head(path: Path, head: bytes) -> None:
    """Refuse, with the fix, what would otherwise be misread: UTF-16 text, CR-only lines."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise TableError(f"{path}: the file is UTF-32 text: save it as UTF-8 "
                         "(e.g. `iconv -f UTF-32 -t UTF-8 in.csv > out.csv`)")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in head:
        raise TableError(f"{path}: the file is UTF-16 text (Excel's \"Unicode Text\") or holds NUL "
                         "bytes: save it as \"CSV UTF-8\", or convert it: `iconv -f UTF-16 -t UTF-8 "
                         "in.csv > out.csv`")
    if b"\r" in head and b"\n" not in head:
        raise TableError(f"{path}: its lines end in CR alone (old Mac line endings): convert them, "
                         "e.g. `tr '\\r' '\\n' < in.csv > out.csv`")


class _Lines:
    """A binary file's lines as text, counting the bytes and lines read, and the lines that
    were not UTF-8 (decoded with U+FFFD in place of the bad bytes).

    csv.reader pulls one line at a time and never reads ahead, so `pos` before a row is
    where that row starts.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self.start = 0  # where the line last returned starts
        self.pos = 0
        self.lineno = 0
        self.not_utf8 = 0  # lines with bytes that are not UTF-8
        self.first_not_utf8 = 0

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
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            self.not_utf8 += 1
            self.first_not_utf8 = self.first_not_utf8 or self.lineno
            return text.decode("utf-8", "replace")


def _csv_problem(path: Path, line: int, exc: csv.Error) -> TableError:
    why = str(exc)
    if "unexpected end of data" in why:
        why = "unbalanced quotes: the quoted field that starts here is never closed"
    elif "field larger than field limit" in why:
        why = (f"a field runs past {FIELD_LIMIT:,} characters: a quote that is never closed "
               "(the field starts here)?")
    else:
        why = f"malformed CSV ({why}): a quote inside a quoted field must be doubled"
    return TableError(f"{path}: line {line}: {why}")


def _delimiter(fmt: str, header: bytes) -> str:
    """The CSV delimiter: a comma, or a semicolon where the header has none and is split by one
    (Excel writes those in locales whose decimal mark is a comma)."""
    if fmt != "csv":
        return DELIMITERS.get(fmt, "")
    line = header.removeprefix(BOM).decode("utf-8", "replace")
    by_comma = next(csv.reader([line]), [])
    by_semicolon = next(csv.reader([line], delimiter=";"), [])
    return ";" if len(by_comma) <= 1 < len(by_semicolon) else ","


class _File:
    """One file's records, in order, with the line each starts on and its byte span."""

    def __init__(self, path: Path):
        self.path = path
        self.fmt = file_format(path)
        self.plain = plain_path(path)
        try:
            with self.plain.open("rb") as f:
                head = f.read(HEAD_BYTES)
                f.seek(0)
                first = f.readline()
                while first and not first.strip() and self.fmt != "jsonl":
                    first = f.readline()
        except OSError as exc:
            raise TableError(f"{path}: cannot read it ({exc.strerror})") from None
        _check_head(path, head)
        self.delimiter = _delimiter(self.fmt, first)
        self.lines: _Lines | None = None

    def records(self) -> Iterator[tuple[int, int, int, list[str] | dict]]:
        """(line, start, end, record) per non-blank record: a list of fields, or a JSON object."""
        path = self.path
        try:
            f = self.plain.open("rb")
        except OSError as exc:
            raise TableError(f"{path}: cannot read it ({exc.strerror})") from None
        with f:
            lines = self.lines = _Lines(f)
            if self.fmt == "jsonl":
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
            reader = csv.reader(lines, delimiter=self.delimiter, strict=True)
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


def _extra_fields(record: list[str] | dict, width: int) -> bool:
    """A CSV/TSV row with more non-empty fields than its header: a field cut in two somewhere."""
    return isinstance(record, list) and len(record) > width and any(v.strip() for v in record[width:])


def scan(paths: list[Path], text_column: str, label_column: str | None, skip_bad_rows: bool,
         key: str, empty_text_ok: bool = False) -> Table:
    """Read every row of `paths` (`data.<key>`) once, keeping where the usable ones lie.

    A row with an empty text or label, or with more fields than its header, is an error,
    or skipped (and counted) with `skip_bad_rows`; `empty_text_ok` skips empty texts without
    an error (unlabelled rows). A file without rows is an error either way. Lines that are
    not UTF-8 are read with U+FFFD for the bad bytes and counted in one warning.
    """
    files, starts, ends, codes = array("i"), array("q"), array("q"), array("i")
    plain, delimiters, fields = [], [], []
    values: dict[str, int] = {}
    first_seen: list[str] = []
    skipped = {EMPTY_TEXT: 0, EMPTY_LABEL: 0, EXTRA_FIELDS: 0}
    first_bad: dict[str, str] = {}
    rows_read, not_utf8, first_not_utf8 = 0, 0, ""
    for index, path in enumerate(paths):
        source = _File(path)
        plain.append(source.plain)
        delimiters.append(source.delimiter)
        records = source.records()
        header = None if source.fmt == "jsonl" else next(records, (0, 0, 0, None))[3]
        rows = 0
        for line, start, end, record in records:
            if header is None:  # JSONL: the first object names the keys
                header = record
            if rows == 0:
                text_field = _field(path, source.fmt, header, text_column, "text_column")
                fields.append(text_field)
                label_field = (_field(path, source.fmt, header, label_column, "label_column")
                               if label_column is not None else None)
            rows += 1
            if source.fmt != "jsonl" and _extra_fields(record, len(header)):
                if not skip_bad_rows:
                    raise TableError(
                        f"{path}: line {line}: {len(record)} fields where the header has {len(header)}: "
                        f"a text with an unquoted {DELIMITER_NAMES[source.delimiter]}? "
                        "Quote the field (\"...\"), or set data.skip_bad_rows: true to skip such rows")
                reason = EXTRA_FIELDS
            else:
                label = _value(record, label_field) if label_field is not None else None
                reason = (EMPTY_TEXT if not _value(record, text_field)
                          else EMPTY_LABEL if label == "" else None)
            if reason is not None:
                skipped[reason] += 1
                first_bad.setdefault(reason, f"{path} line {line}")
                continue
            if label is not None and label not in values:
                values[label] = len(values)
                first_seen.append(f"{path} line {line}")
            files.append(index)
            starts.append(start)
            ends.append(end)
            codes.append(values[label] if label is not None else -1)
        if rows == 0:
            raise TableError(f"{path}: no rows" + (" (only a header)" if header else ""))
        rows_read += rows
        if source.lines is not None and source.lines.not_utf8:
            not_utf8 += source.lines.not_utf8
            first_not_utf8 = first_not_utf8 or f"{path} line {source.lines.first_not_utf8}"
    if not_utf8:
        log.warning("data.%s: %d line(s) are not UTF-8 (the first: %s); they were read with U+FFFD in "
                    "place of the bad bytes: save the file as UTF-8 (Excel: \"CSV UTF-8\") to keep them",
                    key, not_utf8, first_not_utf8)
    _report_skipped(key, skipped, first_bad, text_column, label_column, skip_bad_rows, empty_text_ok)
    if not starts:
        raise TableError(f"data.{key}: no usable rows: {describe_skipped(skipped)}")
    return Table(tuple(paths), tuple(plain), tuple(delimiters), tuple(fields),
                 np.frombuffer(files, np.int32), np.frombuffer(starts, np.int64),
                 np.frombuffer(ends, np.int64), tuple(values), np.frombuffer(codes, np.int32),
                 tuple(first_seen), rows_read, {k: v for k, v in skipped.items() if v})


def describe_skipped(skipped: dict[str, int]) -> str:
    """`2 with an empty text, 1 with more fields than the header`, or `none`."""
    parts = [f"{n} with {'an ' if reason.startswith('empty') else ''}{reason}"
             for reason, n in skipped.items() if n]
    return ", ".join(parts) or "none"


def _report_skipped(key: str, skipped: dict[str, int], first_bad: dict[str, str], text_column: str,
                    label_column: str | None, skip_bad_rows: bool, empty_text_ok: bool) -> None:
    """Raise for rows that cannot be used (unless skipping them was asked for), else log them.

    `first_bad` holds each reason's first row, in the order the reasons were met."""
    named = {EMPTY_TEXT: f"an empty {text_column!r}", EMPTY_LABEL: f"an empty {label_column!r}",
             EXTRA_FIELDS: EXTRA_FIELDS}
    bad = [r for r in first_bad if not (empty_text_ok and r == EMPTY_TEXT)]
    if bad and not skip_bad_rows:
        what = " and ".join(f"{skipped[r]} row(s) with {named[r]}" for r in named if r in bad)
        raise TableError(f"data.{key}: {what} (the first: {first_bad[bad[0]]}): fix them, or set "
                         "data.skip_bad_rows: true to skip them")
    if first_bad:  # empty unlabelled texts are expected, and said quietly
        log.log(logging.WARNING if bad else logging.INFO, "data.%s: skipped %d row(s): %s (the first: %s)",
                key, sum(skipped.values()), describe_skipped(skipped), next(iter(first_bad.values())))


# --- labels --------------------------------------------------------------------------------------


def _order(value: str) -> tuple:
    # Integers in numeric order (-1 before 1, 2 before 10), then text in alphabetical order.
    return (0, int(value), "") if re.fullmatch(r"[+-]?\d+", value) else (1, 0, value)


def _shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")


def _listed(counts: dict[str, int], first_seen: dict[str, str] | None = None) -> str:
    """`'a': 2, 'b': 1`, or with where each first appears `'a' (2 row(s), first at f line 3)`."""
    shown = [f"{_shown(v)} ({n} row(s), first at {first_seen[v]})" if first_seen else f"{_shown(v)}: {n}"
             for v, n in list(counts.items())[:SHOWN]]
    more = len(counts) - SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _why_more_than_two(values: list[str]) -> str:
    """What probably made a third label value, and what to do about it."""
    by_case: dict[str, list[str]] = {}
    for v in values:
        by_case.setdefault(v.casefold(), []).append(v)
    variants = next((vs for vs in by_case.values() if len(vs) > 1), None)
    if variants:
        return f"{' and '.join(map(repr, variants))} differ only in case: write each label one way"
    kinds = {"number" if re.fullmatch(r"[+-]?\d+(\.\d*)?", v) else
             "boolean" if v.casefold() in ("true", "false") else "text" for v in values}
    if {"number", "boolean"} <= kinds:
        return "numbers and true/false are mixed: write each label one way (e.g. 0/1 throughout)"
    return ("a model here learns two classes: relabel or remove the rows of the others (a text cut "
            "at an unquoted comma can also shift words into the label column: quote such texts)")


def class_names(table: Table, given: tuple[str, str] | None, label_column: str, key: str
                ) -> tuple[str, str]:
    """(negative, positive): `given` (data.labels), or the two values found, in sorted order.

    Exactly two classes: one, or more than two, is an error that names them with their counts
    and, for more, where the rarer ones first appear and what probably made them.
    """
    counts = table.label_counts()
    seen = dict(zip(table.values, table.first_seen, strict=False))
    if given is not None:
        unknown = {v: n for v, n in counts.items() if v not in given}
        if unknown:
            raise TableError(f"data.{key}: the label column {label_column!r} holds "
                             f"{_listed(unknown, seen)}, not one of data.labels {list(given)}")
    if len(counts) < 2:
        raise TableError(f"data.{key}: the label column {label_column!r} has {len(counts)} "
                         f"class(es) ({_listed(counts)} rows): exactly two are needed")
    if len(counts) > 2:
        rare = dict(list(counts.items())[2:])
        raise TableError(f"data.{key}: the label column {label_column!r} has {len(counts)} values where "
                         f"two are needed: {_listed(dict(list(counts.items())[:2]))} rows, and "
                         f"{_listed(rare, seen)}; {_why_more_than_two(list(counts))}")
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
        seen = dict(zip(table.values, table.first_seen, strict=False))
        raise TableError(f"data.{key}: labels {_listed(counts, seen)} are not among the "
                         f"training labels {list(names)}")
    lookup = np.array([index[v] for v in table.values], dtype=np.int64)
    return lookup[table.codes]


# --- reading rows back ---------------------------------------------------------------------------


def read_texts(table: Table, rows: np.ndarray) -> Iterator[str]:
    """The texts of `rows` (indices into `table`), in that order, each read from its offset."""
    handles: dict[int, BinaryIO] = {}
    try:
        for row in rows:
            i = int(table.file[row])
            if i not in handles:
                handles[i] = table.plain[i].open("rb")
            f = handles[i]
            f.seek(int(table.start[row]))
            chunk = f.read(int(table.end[row] - table.start[row])).removeprefix(BOM)
            text = chunk.decode("utf-8", "replace")
            if not table.delimiters[i]:
                record: list[str] | dict = json.loads(text)
            else:
                record = next(csv.reader(io.StringIO(text, newline=""), delimiter=table.delimiters[i]))
            yield _value(record, table.fields[i])
    finally:
        for f in handles.values():
            f.close()


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
        source = _File(path)
        header = next(source.records())[3]  # CSV, TSV: the header row; JSONL: the first object
        fields.append(_field(path, source.fmt, header, column, key))
    yield from read_texts(dataclasses.replace(table, fields=tuple(fields)), np.arange(len(table)))
