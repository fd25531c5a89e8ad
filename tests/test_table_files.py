import codecs
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.table_files import TableError, content_digest, expand
from pipeline.tables import binary_labels, class_names, read_texts, scan
from tests.helpers import write_table

ROWS = [{"text": "a fine film", "label": "good"}, {"text": 'said "dull",\nthen left', "label": "bad"},
        {"text": "ok  ", "label": "good"}]


def read_rows(path, **kwargs):
    """The table of one file, and every row's text, read back."""
    table = scan([path], "text", "label", False, "train_files", **kwargs)
    return table, list(read_texts(table, np.arange(len(table))))


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_each_format_reads_the_same_rows_and_labels(tmp_path, ext):
    table, texts = read_rows(write_table(tmp_path / f"r.{ext}", ROWS))
    assert texts == ["a fine film", 'said "dull",\nthen left', "ok"]  # quotes and newlines kept
    names = class_names(table, None, "label", "train_files")
    assert names == ("bad", "good")  # sorted: the second is the positive one
    assert binary_labels(table, names, "train_files").tolist() == [1, 0, 1]


def test_bom_crlf_and_bad_bytes(tmp_path, caplog):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\ncaf\xe9 noir,pos\r\nfine,neg\r\nna\xefve,pos\r\n")
    table, texts = read_rows(path)
    assert texts == ["caf\ufffd noir", "fine", "na\ufffdve"]  # no BOM in the header; bad bytes replaced
    # ... and said once, with the count and the first line
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert f"2 line(s) are not UTF-8 (the first: {path} line 2)" in warnings[0]


@pytest.mark.parametrize("name,content,problem", [
    ("r.csv", 'text,label\nfine,pos\n"never closed,neg\nlater,pos\n', r"r.csv: line 3: unbalanced quotes"),
    ("r.jsonl", '{"text": "x", "label": 1}\n{"text": oops}\n', r"r.jsonl: line 2: not valid JSON"),
])
def test_a_broken_row_names_its_file_and_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TableError, match=problem):
        scan([path], "text", "label", False, "train_files")


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
    assert read_rows(path)[1] == [long.strip(), "x"]


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
    assert read_rows(path)[1] == ["café noir", "fine"]


def test_cr_only_line_endings_are_named_and_the_fix_reads(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b"text,label\rfine film,pos\rdull,neg\r")
    with pytest.raises(TableError, match=r"mac.csv: its lines end in CR alone \(old Mac line endings\): "
                                         r"convert them"):
        scan([path], "text", "label", False, "train_files")
    path.write_bytes(path.read_bytes().replace(b"\r", b"\n"))  # what `tr '\r' '\n'` does
    assert read_rows(path)[1] == ["fine film", "dull"]


def test_excel_european_csv_semicolons_and_cp1252(tmp_path, caplog):
    path = tmp_path / "excel.csv"
    path.write_bytes('text;label\r\n"Crème brûlée; great";pos\r\nplain;neg\r\n'.encode("cp1252"))
    table, texts = read_rows(path)
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
    assert read_rows(packed)[1] == read_rows(plain)[1]
    assert read_rows(packed)[0].paths == (packed,)  # errors name the user's file
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
    table, texts = read_rows(pandas)
    assert texts == ["10/10, loved it", "meh é"] and class_names(table, None, "label", "p") == ("0", "1")
    sheets = tmp_path / "s.tsv"  # Google Sheets: CRLF, tabs, quotes only where needed
    sheets.write_bytes(b'text\tlabel\r\nsaid "hi"\tpos\r\n"two\r\nlines"\tneg\r\n')
    assert read_rows(sheets)[1] == ['said "hi"', "two\r\nlines"]
