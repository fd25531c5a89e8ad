import os

import numpy as np
import pytest

from pipeline.tables import (
    TableError,
    binary_labels,
    class_names,
    content_digest,
    expand,
    read_texts,
    scan,
    stream_texts,
)
from tests.helpers import review_rows, write_table

ROWS = [{"text": "a fine film", "label": "good"}, {"text": 'said "dull",\nthen left', "label": "bad"},
        {"text": "ok  ", "label": "good"}]


def _read(path, **kwargs):
    table = scan([path], "text", "label", False, "train_files", **kwargs)
    return table, list(read_texts(table, np.arange(len(table))))


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_each_format_reads_the_same_rows_and_labels(tmp_path, ext):
    table, texts = _read(write_table(tmp_path / f"r.{ext}", ROWS))
    assert texts == ["a fine film", 'said "dull",\nthen left', "ok"]  # quotes and newlines kept
    names = class_names(table, None, "label", "train_files")
    assert names == ("bad", "good")  # sorted: the second is the positive one
    assert binary_labels(table, names, "train_files").tolist() == [1, 0, 1]


def test_rows_are_read_in_the_order_asked(tmp_path):
    table, _ = _read(write_table(tmp_path / "r.csv", ROWS))
    assert list(read_texts(table, np.array([2, 0]))) == ["ok", "a fine film"]


def test_bom_crlf_and_bad_bytes(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\ncaf\xe9 noir,pos\r\nfine,neg\r\n")
    table, texts = _read(path)
    assert texts == ["caf\ufffd noir", "fine"]  # the BOM is not part of the header; bad bytes replaced


def test_integer_labels_sort_as_numbers_and_labels_fix_the_positive(tmp_path):
    path = write_table(tmp_path / "r.jsonl", [{"text": "x", "label": 10}, {"text": "y", "label": 2}])
    table = scan([path], "text", "label", False, "train_files")
    assert class_names(table, None, "label", "train_files") == ("2", "10")
    assert class_names(table, ("10", "2"), "label", "train_files") == ("10", "2")
    assert binary_labels(table, ("10", "2"), "train_files").tolist() == [0, 1]


@pytest.mark.parametrize("labels,match", [
    (("pos",), r"has 1 class\(es\) \('pos': 4 rows\): exactly two are needed$"),
    (("a", "b", "c"), r"has 3 class\(es\) \('a': 2, 'b': 1, 'c': 1 rows\).*multi-class is not supported yet"),
])
def test_class_count_is_named_with_counts(tmp_path, labels, match):
    table = scan([write_table(tmp_path / "r.csv", review_rows(4, labels * 2))], "text", "label",
                 False, "train_files")
    with pytest.raises(TableError, match=match):
        class_names(table, None, "label", "train_files")


def test_a_label_outside_data_labels_is_named(tmp_path):
    table = scan([write_table(tmp_path / "r.csv", review_rows(4, ("neg", "meh")))], "text", "label",
                 False, "train_files")
    with pytest.raises(TableError, match=r"'meh': 2 \(rows\), not one of data.labels \['neg', 'pos'\]"):
        class_names(table, ("neg", "pos"), "label", "train_files")


def test_missing_column_names_the_columns_found(tmp_path):
    path = write_table(tmp_path / "r.csv", [{"review": "x", "label": "a"}])
    with pytest.raises(TableError, match=r"no column 'text' \(columns found: 'review', 'label'\); "
                                         r"set data.text_column"):
        scan([path], "text", "label", False, "train_files")


def test_empty_texts_and_labels_are_counted_then_skipped_on_request(tmp_path, caplog):
    rows = review_rows(6) + [{"text": " ", "label": "pos"}, {"text": "x", "label": ""},
                             {"text": "", "label": "neg"}]
    path = write_table(tmp_path / "r.csv", rows)
    with pytest.raises(TableError, match=r"2 row\(s\) with an empty 'text' and 1 row\(s\) with an "
                                         r"empty 'label' \(the first: .*r.csv line 8\).*skip_bad_rows"):
        scan([path], "text", "label", False, "train_files")
    assert len(scan([path], "text", "label", True, "train_files")) == 6
    assert "skipped 2 row(s)" in caplog.text


@pytest.mark.parametrize("name,content,problem", [
    ("r.csv", 'text,label\nfine,pos\n"never closed,neg\nlater,pos\n', r"r.csv: line 3: unbalanced quotes"),
    ("r.jsonl", '{"text": "x", "label": 1}\n{"text": oops}\n', r"r.jsonl: line 2: not valid JSON"),
])
def test_a_broken_row_names_its_file_and_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TableError, match=problem):
        scan([path], "text", "label", False, "train_files")


def test_a_file_without_rows(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TableError, match=r"h.csv: no rows \(only a header\)"):
        scan([tmp_path / "h.csv"], "text", "label", False, "train_files")
    with pytest.raises(TableError, match=r"e.jsonl: no rows$"):
        scan([tmp_path / "e.jsonl"], "text", "label", False, "train_files")


def test_paths_and_globs(tmp_path):
    for name in ("b.csv", "a.csv"):
        write_table(tmp_path / name, ROWS)
    assert [p.name for p in expand(str(tmp_path / "*.csv"), "train_files")] == ["a.csv", "b.csv"]
    with pytest.raises(TableError, match=r"data.train_files: no file matches"):
        expand(str(tmp_path / "*.tsv"), "train_files")
    with pytest.raises(TableError, match=r"data.test_files: '.*nope.csv' does not exist"):
        expand(str(tmp_path / "nope.csv"), "test_files")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(TableError, match=r"cannot tell the format from the extension '.txt'"):
        expand(str(tmp_path / "r.txt"), "train_files")


def test_unlabelled_texts_stream_and_skip_empty_ones(tmp_path):
    path = write_table(tmp_path / "u.tsv", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    assert list(stream_texts([path], "text")) == ["one", "two"]


def test_the_digest_follows_the_content(tmp_path):
    path = write_table(tmp_path / "r.csv", ROWS)
    before = content_digest([path])
    assert content_digest([path]) == before
    path.write_text(path.read_text().replace("fine", "fun!"))  # same size, new content
    os.utime(path, ns=(1, 1))
    assert content_digest([path]) != before
