import codecs
import gzip
import os
from pathlib import Path

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


def test_bom_crlf_and_bad_bytes(tmp_path, caplog):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\ncaf\xe9 noir,pos\r\nfine,neg\r\nna\xefve,pos\r\n")
    table, texts = _read(path)
    assert texts == ["caf\ufffd noir", "fine", "na\ufffdve"]  # no BOM in the header; bad bytes replaced
    # ... and said once, with the count and the first line
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert f"2 line(s) are not UTF-8 (the first: {path} line 2)" in warnings[0]


def test_integer_labels_sort_as_numbers_and_labels_fix_the_positive(tmp_path):
    path = write_table(tmp_path / "r.jsonl", [{"text": "x", "label": 10}, {"text": "y", "label": 2}])
    table = scan([path], "text", "label", False, "train_files")
    assert class_names(table, None, "label", "train_files") == ("2", "10")
    assert class_names(table, ("10", "2"), "label", "train_files") == ("10", "2")
    assert binary_labels(table, ("10", "2"), "train_files").tolist() == [0, 1]


@pytest.mark.parametrize("labels,match", [
    (("pos",), r"has 1 class\(es\) \('pos': 4 rows\): exactly two are needed$"),
    (("a", "b", "c"), r"has 3 values where two are needed: 'a': 2, 'b': 1 rows, and 'c' "
                      r"\(1 row\(s\), first at .*r.csv line 4\); "
                      r"a model here learns two classes: relabel or remove the rows of the others"),
])
def test_class_count_is_named_with_counts(tmp_path, labels, match):
    table = scan([write_table(tmp_path / "r.csv", review_rows(4, labels * 2))], "text", "label",
                 False, "train_files")
    with pytest.raises(TableError, match=match):
        class_names(table, None, "label", "train_files")


def test_a_label_outside_data_labels_is_named(tmp_path):
    table = scan([write_table(tmp_path / "r.csv", review_rows(4, ("neg", "meh")))], "text", "label",
                 False, "train_files")
    with pytest.raises(TableError, match=r"holds 'meh' \(2 row\(s\), first at .*r.csv line 3\), not one of "
                                         r"data.labels \['neg', 'pos'\]$"):
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
    table = scan([path], "text", "label", True, "train_files")
    assert len(table) == 6 and table.rows_read == 9
    assert table.skipped == {"empty text": 2, "empty label": 1}
    assert "skipped 3 row(s): 2 with an empty text, 1 with an empty label (the first:" in caplog.text


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


def test_unlabelled_rows_leave_out_empty_texts(tmp_path):
    path = write_table(tmp_path / "u.tsv", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    table = scan([path], "text", None, False, "unlabelled_files", empty_text_ok=True)
    assert list(read_texts(table, np.arange(len(table)))) == ["one", "two"]
    assert table.skipped == {"empty text": 1}


def test_the_digest_follows_the_content(tmp_path):
    path = write_table(tmp_path / "r.csv", ROWS)
    before = content_digest([path])
    assert content_digest([path]) == before
    path.write_text(path.read_text().replace("fine", "fun!"))  # same size, new content
    os.utime(path, ns=(1, 1))
    assert content_digest([path]) != before


# --- files as users send them: each refusal names the fix, and the fix works ----------------------


def test_a_field_longer_than_pythons_csv_limit_is_read_whole(tmp_path):
    long = "word " * 40_000  # 200,000 characters: past csv's default limit of 131,072
    path = write_table(tmp_path / "r.csv", [{"text": long, "label": "pos"}, {"text": "x", "label": "neg"}])
    assert _read(path)[1] == [long.strip(), "x"]


@pytest.mark.parametrize("header,row,text", [
    ("label,text", "good,the, film was great", "the"),  # the label first: the text was cut
    ("text,label", "the, film was great,good", "the"),  # the text first: its tail became a class
])
def test_an_unquoted_comma_is_refused_with_its_line_or_skipped_and_counted(tmp_path, header, row, text):
    path = tmp_path / "r.csv"
    first = "fine film,good" if header.startswith("text") else "good,fine film"
    path.write_text(f"{header}\n{first}\n{row}\n")
    with pytest.raises(TableError, match=r"r.csv: line 3: 3 fields where the header has 2: a text with an "
                                         r"unquoted comma\? Quote the field \(\"...\"\), or set "
                                         r"data.skip_bad_rows: true to skip such rows$"):
        scan([path], "text", "label", False, "train_files")
    table = scan([path], "text", "label", True, "train_files")
    assert len(table) == 1 and table.skipped == {"more fields than the header": 1}
    # the fix the message names: quote the text
    fixed = row.replace("the, film was great", '"the, film was great"')
    path.write_text(path.read_text().replace(row, fixed))
    assert "the, film was great" in _read(path)[1]


def test_trailing_empty_fields_are_not_a_cut_text(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\nfine film,good,\ndull,bad,,\n")  # spreadsheets pad rows so
    assert _read(path)[1] == ["fine film", "dull"]


def test_an_unreadable_file_reached_through_a_glob_is_one_line(tmp_path, monkeypatch):
    write_table(tmp_path / "a.csv", ROWS)
    locked = write_table(tmp_path / "b.csv", ROWS)
    real_access = os.access
    # root reads any file, so the permission is refused here the way it is for a user
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(TableError, match=r"data.train_files: '.*b.csv' is not a readable file: fix its "
                                         r"permissions or leave it out$"):
        expand(str(tmp_path / "*.csv"), "train_files")
    os.symlink(tmp_path / "gone.csv", tmp_path / "c.csv")  # a broken link is named, not passed over
    monkeypatch.setattr(os, "access", real_access)
    with pytest.raises(TableError, match=r"'.*c.csv' is not a readable file"):
        expand(str(tmp_path / "*.csv"), "train_files")


@pytest.mark.parametrize("labels,why", [
    (("pos", "neg", "POS"), r"'pos' and 'POS' differ only in case: write each label one way$"),
    ((1, 0, "true"), r"numbers and true/false are mixed: write each label one way"),
])
def test_a_third_label_value_says_what_it_is_and_where(tmp_path, labels, why):
    rows = review_rows(9, labels[:2]) + [{"text": "x", "label": labels[2]}]
    path = write_table(tmp_path / "r.csv", rows)
    table = scan([path], "text", "label", False, "train_files")
    with pytest.raises(TableError, match=rf"and '{labels[2]}' \(1 row\(s\), first at .*r.csv line 11\); "
                                         rf"{why}"):
        class_names(table, None, "label", "train_files")
    rows[-1]["label"] = labels[0]  # the fix it names: one spelling
    table = scan([write_table(path, rows)], "text", "label", False, "train_files")
    assert class_names(table, None, "label", "train_files") == tuple(sorted(map(str, labels[:2])))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_is_named_and_the_fix_reads(tmp_path, encoding):
    path = tmp_path / "excel.csv"
    content = "text,label\ncafé noir,pos\nfine,neg\n"
    path.write_bytes(content.encode(encoding) if encoding == "utf-16" else codecs.BOM_UTF16_BE
                     + content.encode(encoding))
    with pytest.raises(TableError, match=r"excel.csv: the file is UTF-16 text .*save it as \"CSV UTF-8\", "
                                         r"or convert it: `iconv -f UTF-16 -t UTF-8 in.csv > out.csv`$"):
        scan([path], "text", "label", False, "train_files")
    path.write_bytes(path.read_bytes().decode("utf-16").encode("utf-8"))  # what iconv does
    assert _read(path)[1] == ["café noir", "fine"]


def test_cr_only_line_endings_are_named_and_the_fix_reads(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b"text,label\rfine film,pos\rdull,neg\r")
    with pytest.raises(TableError, match=r"mac.csv: its lines end in CR alone \(old Mac line endings\): "
                                         r"convert them"):
        scan([path], "text", "label", False, "train_files")
    path.write_bytes(path.read_bytes().replace(b"\r", b"\n"))  # what `tr '\r' '\n'` does
    assert _read(path)[1] == ["fine film", "dull"]


def test_excel_european_csv_semicolons_and_cp1252(tmp_path, caplog):
    path = tmp_path / "excel.csv"
    path.write_bytes('text;label\r\n"Crème brûlée; great";pos\r\nplain;neg\r\n'.encode("cp1252"))
    table, texts = _read(path)
    assert texts == ["Cr\ufffdme br\ufffdl\ufffde; great", "plain"]
    assert class_names(table, None, "label", "train_files") == ("neg", "pos")
    assert "1 line(s) are not UTF-8" in caplog.text
    path.write_bytes(b"text;label\nCreme; brulee;pos\n")  # a semicolon file names its own delimiter
    with pytest.raises(TableError, match=r"line 2: 3 fields .*an unquoted semicolon\?"):
        scan([path], "text", "label", False, "train_files")


def test_gzipped_files_read_like_plain_ones(tmp_path):
    plain = write_table(tmp_path / "r.tsv", ROWS)
    packed = tmp_path / "r.tsv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert expand(str(tmp_path / "*.gz"), "train_files") == [packed]
    assert _read(packed)[1] == _read(plain)[1]
    assert _read(packed)[0].paths == (packed,)  # errors name the user's file
    broken = tmp_path / "b.csv.gz"
    broken.write_bytes(packed.read_bytes()[:20])
    with pytest.raises(TableError, match=r"b.csv.gz: cannot decompress it \(.*\): is it a whole gzip "
                                         r"file\?$"):
        scan([broken], "text", "label", False, "train_files")


def test_pandas_json_lines_and_google_sheets_tsv(tmp_path):
    # pandas' to_json(orient="records", lines=True): escaped slashes, integer labels, nulls
    pandas = tmp_path / "p.jsonl"
    pandas.write_text('{"text":"10\\/10, loved it","label":1,"note":null}\n'
                      '{"text":"meh \\u00e9","label":0,"note":"x"}\n')
    table, texts = _read(pandas)
    assert texts == ["10/10, loved it", "meh é"] and class_names(table, None, "label", "p") == ("0", "1")
    sheets = tmp_path / "s.tsv"  # Google Sheets: CRLF, tabs, quotes only where needed
    sheets.write_bytes(b'text\tlabel\r\nsaid "hi"\tpos\r\n"two\r\nlines"\tneg\r\n')
    assert _read(sheets)[1] == ['said "hi"', "two\r\nlines"]


def test_label_values_given_on_the_command_line_stay_text(tmp_path):
    from pipeline.config import load_config

    path = write_table(tmp_path / "r.csv", review_rows(4, ("-1", "+1")))
    table = scan([path], "text", "label", False, "train_files")
    labels = load_config(None, ['data.labels=["-1","+1"]']).data.label_names()  # quotes stripped by --set
    assert labels == ("-1", "+1") and class_names(table, labels, "label", "train_files") == labels
    assert load_config(None, ["data.labels=[false,true]"]).data.labels == ["false", "true"]
