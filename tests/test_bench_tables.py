import csv

from pipeline import bench_tables
from pipeline.tables import read_texts, scan


def test_the_written_csv_is_what_the_scan_reads(tmp_path):
    path = tmp_path / "r.csv"
    assert bench_tables.write_csv(path, words_per_row=5, max_rows=7) == 7
    table = scan([path], "text", "label", False, "train_files")
    texts = list(read_texts(table, range(7)))
    with path.open(newline="") as f:
        assert texts == [row[0] for row in list(csv.reader(f))[1:]]  # a comma and quotes inside, kept
    assert table.label_counts() == {"neg": 4, "pos": 3}


def test_bench_tables_counts_every_row_of_both_files(tmp_path):
    results = bench_tables.run(size_mb=0.05, short_rows=300, folder=tmp_path)
    assert list(results) == ["reviews", "short rows"]
    assert results["short rows"]["rows"] == 300
    for r in results.values():
        assert r["scan"]["rows"] == r["csv_pass"]["rows"] == r["rows"]
        ratio = r["scan"]["seconds"] / (2 * r["csv_pass"]["seconds"])
        assert r["scan_over_two_csv_passes"] == round(ratio, 3)
    assert list(tmp_path.iterdir()) == []  # the scratch files are gone
    table = bench_tables.markdown_table(results)
    assert table.splitlines()[2].startswith(f"| reviews | 0 MiB | {results['reviews']['rows']:,} |")
