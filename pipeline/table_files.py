"""Table files and their records: the files a path or glob names (`expand`) and a digest of
their contents (`content_digest`); for each file, the format from the extension, a gzipped
file's plain copy, the encoding and line endings checked and the CSV delimiter found, then
each record (a list of fields, or a JSON object) with its line and byte span (`File`), and
one record parsed back from its bytes (`parse`).

`pipeline.tables` decides which records are usable rows and reads them back by position.
Every problem is a `TableError` of one line that names the file (and the line).
"""

from __future__ import annotations

import atexit
import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import PipelineError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon"}
BOM = codecs.BOM_UTF8  # spreadsheet exports often start with one; it is not part of the header
HEAD_BYTES = 1 << 16  # what is looked at for the encoding and the line endings
# Python's csv refuses fields past 131,072 characters by default; a long review is valid, so
# the limit is only a guard against a quote that is never closed swallowing the whole file.
FIELD_LIMIT = 1 << 28
csv.field_size_limit(FIELD_LIMIT)


class TableError(PipelineError):
    """A table file that cannot be used as it is; the message names the file and what to fix."""


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


class File:
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


def field_value(record: list[str] | dict, field: int | str) -> str:
    """A field as text: a missing field, null and whitespace alone are all empty."""
    if isinstance(record, list):
        value = record[field] if isinstance(field, int) and field < len(record) else ""
    else:
        value = record.get(field)
        if isinstance(value, bool):  # JSON spells them true/false, Python True/False
            value = "true" if value else "false"
        value = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    return value.strip()


def find_field(path: Path, fmt: str, header: list[str] | dict, name: str, key: str) -> int | str:
    """Where column `name` is in this file: its index (CSV, TSV) or its key (JSONL)."""
    found = [h.strip() for h in header] if isinstance(header, list) else list(header)
    if name not in found:
        what = "keys" if fmt == "jsonl" else "columns"
        raise TableError(f"{path}: no column {name!r} ({what} found: {', '.join(map(repr, found))}); "
                         f"set data.{key}")
    return found.index(name) if isinstance(header, list) else name


def parse(chunk: bytes, delimiter: str) -> list[str] | dict:
    """One record back from its bytes (a span that `File.records` gave): a JSON object where
    `delimiter` is "" (JSONL), else the fields of one CSV or TSV record."""
    text = chunk.removeprefix(BOM).decode("utf-8", "replace")
    if not delimiter:
        return json.loads(text)
    return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
