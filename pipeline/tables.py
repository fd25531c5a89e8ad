"""Rows of CSV, TSV and JSON-lines files (plain or gzipped): checked in one streamed pass, then
read by position.

`scan` reads every row once and keeps only where each usable row lies in its file and its
label's value, so a file never has to fit in memory; `read_texts` reads the texts of the
rows asked for, in that order, by seeking to each. `class_names` and `binary_labels` turn
the label values into the two classes. Each file's records come from
`pipeline.table_files` (the format, gzip, the encoding and line endings, the delimiter).

Nothing is cut or dropped without a word: a row with more fields than its header, an
empty text or label, a file that is not UTF-8 text are each an error or, where the user
asks (`skip_bad_rows`) or the bytes are merely not UTF-8, counted and logged. Every problem
is a `TableError` of one line that names the file (and the line). No TensorFlow here:
`pipeline.data` turns tables into datasets.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.table_files import (
    DELIMITER_NAMES,
    File,
    TableError,
    field_value,
    find_field,
    parse,
)

log = logging.getLogger(__name__)

SHOWN = 6  # label values an error names, at most
SHOWN_CHARS = 40  # of each value: a text shifted into the label column can be long

# Why a row was skipped (skip_bad_rows), as the summary and the errors say it.
EMPTY_TEXT, EMPTY_LABEL, EXTRA_FIELDS = "empty text", "empty label", "more fields than the header"


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
        source = File(path)
        plain.append(source.plain)
        delimiters.append(source.delimiter)
        records = source.records()
        header = None if source.fmt == "jsonl" else next(records, (0, 0, 0, None))[3]
        rows = 0
        for line, start, end, record in records:
            if header is None:  # JSONL: the first object names the keys
                header = record
            if rows == 0:
                text_field = find_field(path, source.fmt, header, text_column, "text_column")
                fields.append(text_field)
                label_field = (find_field(path, source.fmt, header, label_column, "label_column")
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
                label = field_value(record, label_field) if label_field is not None else None
                reason = (EMPTY_TEXT if not field_value(record, text_field)
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
            record = parse(f.read(int(table.end[row] - table.start[row])), table.delimiters[i])
            yield field_value(record, table.fields[i])
    finally:
        for f in handles.values():
            f.close()


def read_column(table: Table, column: str, key: str) -> Iterator[str]:
    """The values of another column (`data.<key>`) of every row of `table`, in order; a row
    without it gives "". A file without that column is an error naming the columns it has."""
    fields = []
    for path in table.paths:
        source = File(path)
        header = next(source.records())[3]  # CSV, TSV: the header row; JSONL: the first object
        fields.append(find_field(path, source.fmt, header, column, key))
    yield from read_texts(dataclasses.replace(table, fields=tuple(fields)), np.arange(len(table)))
