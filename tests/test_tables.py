import numpy as np
import pytest

from pipeline.tables import TableError, binary_labels, class_names, read_texts, scan
from tests.helpers import review_rows, write_table
from tests.test_table_files import ROWS, read_rows


def test_rows_are_read_in_the_order_asked(tmp_path):
    table, _ = read_rows(write_table(tmp_path / "r.csv", ROWS))
    assert list(read_texts(table, np.array([2, 0]))) == ["ok", "a fine film"]


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


def test_a_file_without_rows(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TableError, match=r"h.csv: no rows \(only a header\)"):
        scan([tmp_path / "h.csv"], "text", "label", False, "train_files")
    with pytest.raises(TableError, match=r"e.jsonl: no rows$"):
        scan([tmp_path / "e.jsonl"], "text", "label", False, "train_files")


def test_unlabelled_rows_leave_out_empty_texts(tmp_path):
    path = write_table(tmp_path / "u.tsv", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    table = scan([path], "text", None, False, "unlabelled_files", empty_text_ok=True)
    assert list(read_texts(table, np.arange(len(table)))) == ["one", "two"]
    assert table.skipped == {"empty text": 1}


# --- files as users send them: each refusal names the fix, and the fix works ----------------------


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
    assert "the, film was great" in read_rows(path)[1]


def test_trailing_empty_fields_are_not_a_cut_text(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\nfine film,good,\ndull,bad,,\n")  # spreadsheets pad rows so
    assert read_rows(path)[1] == ["fine film", "dull"]


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


def test_label_values_given_on_the_command_line_stay_text(tmp_path):
    from pipeline.config import load_config

    path = write_table(tmp_path / "r.csv", review_rows(4, ("-1", "+1")))
    table = scan([path], "text", "label", False, "train_files")
    labels = load_config(None, ['data.labels=["-1","+1"]']).data.label_names()  # quotes stripped by --set
    assert labels == ("-1", "+1") and class_names(table, labels, "label", "train_files") == labels
    assert load_config(None, ["data.labels=[false,true]"]).data.labels == ["false", "true"]
