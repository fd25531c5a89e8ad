import ast
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as sk

from pipeline import stats
from pipeline.cli import main
from pipeline.evaluate import column_slices, length_slices
from pipeline.predict import load, score
from tests.helpers import make_review, tiny_tfds, write_table

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = ("books", "films", "games")


def _labelled(path: Path, n: int = 90, labels: tuple[str, str] = ("neg", "pos"), **columns: str) -> Path:
    """`n` tiny reviews with a product column (`text="review"` renames a column); every seventh
    label is the wrong one (46 positives in 90), so even a model that learnt the tiny data makes
    confident mistakes."""
    rng = random.Random(3)
    rows = []
    for i in range(n):
        label = i % 2
        shown = 1 - label if i % 7 == 0 else label
        rows.append({"text": make_review(rng, label), "label": labels[shown], "product": PRODUCTS[i % 3]})
    return write_table(path, [{columns.get(k, k): v for k, v in row.items()} for row in rows])


def _run(*args: str) -> int:
    return main(["evaluate", *args])


def _folder(out: Path) -> Path:
    (folder,) = out.iterdir()
    return folder


def test_evaluate_a_csv_with_slices_equals_scikit_learn(trained_run, tmp_path, capsys):
    _, result = trained_run
    table = _labelled(tmp_path / "reviews.csv")
    out = tmp_path / "evaluation"
    assert _run("--model", result.export.path, "--data", str(table), "--slice-by", "product",
                "--fit-threshold", "f1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    folder = _folder(out)
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.png", "metrics.json", "report.md"]
    assert f"report: {folder / 'report.md'}" in printed
    m = json.loads((folder / "metrics.json").read_text())

    # The same predictions, scored here through the SavedModel, checked with scikit-learn.
    import csv

    rows = list(csv.DictReader(table.open()))
    p, _ = score(load(Path(result.export.path))[1], [r["text"] for r in rows])
    y = np.array([r["label"] == "pos" for r in rows], dtype=int)
    called = p >= 0.5
    got = m["metrics"]
    assert (m["rows"], m["labels"], m["label_names_from"]) == (90, ["neg", "pos"], "the export's labels file")
    assert got["accuracy"]["value"] == sk.accuracy_score(y, called)
    assert got["precision"]["value"] == sk.precision_score(y, called)
    assert got["recall"]["value"] == sk.recall_score(y, called)
    assert got["f1"]["value"] == pytest.approx(sk.f1_score(y, called))
    assert got["auc"]["value"] == pytest.approx(sk.roc_auc_score(y, p))
    assert got["log_loss"]["value"] == pytest.approx(sk.log_loss(y, p))
    assert got["brier"]["value"] == pytest.approx(sk.brier_score_loss(y, p))
    (tn, fp), (fn, tp) = sk.confusion_matrix(y, called)
    assert got["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert got["accuracy"]["interval"] == list(stats.wilson_interval(tn + tp, 90))
    assert m["calibration"]["ece"] == pytest.approx(stats.expected_calibration_error(y, p))
    assert f"accuracy {got['accuracy']['value']:.4f} (95% " in printed

    # Slices: length quartiles and products, each a partition of the rows, worst first.
    for slicing, expected in (("length", None), ("product", {name: 30 for name in PRODUCTS})):
        group = [s for s in m["slices"] if s["slicing"] == slicing]
        assert sum(s["rows"] for s in group) == 90
        assert [s["accuracy"] for s in group] == sorted(s["accuracy"] for s in group)
        if expected:
            assert {s["slice"]: s["rows"] for s in group} == expected
            for s in group:
                inside = np.array([r["product"] == s["slice"] for r in rows])
                assert s["accuracy"] == pytest.approx(np.mean(called[inside] == y[inside]))

    # The most confident errors: wrong, most confident first, shortened.
    wrong = np.flatnonzero(called != y)
    assert len(m["errors"]) == min(20, wrong.size) > 0
    confidence = [abs(e["probability"] - 0.5) for e in m["errors"]]
    assert confidence == sorted(confidence, reverse=True)
    for e in m["errors"]:
        assert e["label"] != e["predicted"] and len(e["text"]) <= 300
        assert rows[e["row"]]["text"].startswith(e["text"]) and e["label"] == rows[e["row"]]["label"]
    (threshold,) = m["thresholds"]
    assert (threshold["metric"], threshold["value"]) == ("f1", stats.best_threshold(y, p, "f1")[1])
    assert m["speed"][0]["reviews_per_second"] > 0 and m["speed"][0]["batch"] == 256


def test_against_a_worse_export_says_which_is_better_by_how_much(trained_run, worse_export, tmp_path, capsys):
    _, result = trained_run
    table = _labelled(tmp_path / "reviews.jsonl")
    out = tmp_path / "evaluation"
    assert _run("--model", result.export.path, "--against", str(worse_export), "--data", str(table),
                "--slice-by", "product", "--out", str(out)) == 0
    m = json.loads((_folder(out) / "metrics.json").read_text())
    cmp = m["against"]["comparison"]
    assert cmp["b"] == pytest.approx(46 / 90)  # the worse export calls every review positive
    assert cmp["difference"] == pytest.approx(cmp["b"] - m["metrics"]["accuracy"]["value"])
    half = (cmp["high"] - cmp["low"]) / 2 * 100
    sentence = (f"{result.export.path} is better by {-cmp['difference'] * 100:.2f} ± {half:.2f} points "
                f"(p = {cmp['p']:.2g})")
    assert cmp["p"] < 0.05 and m["against"]["sentence"] == sentence
    assert sentence in capsys.readouterr().out
    assert all("against" in s for s in m["slices"])
    assert sum(s["against"]["rows"] for s in m["slices"] if s["slicing"] == "product") == 90

    # One export against itself: no difference at all.
    assert _run("--model", str(worse_export), "--against", str(worse_export), "--data", str(table),
                "--out", str(tmp_path / "self")) == 0
    assert capsys.readouterr().out.count("no difference beyond noise") == 1


def test_evaluate_a_tfds_split(trained_run, tmp_path, capsys):
    _, result = trained_run
    tiny_tfds(tmp_path / "tfds")
    out = tmp_path / "evaluation"
    where = ["--set", f"data.data_dir={tmp_path / 'tfds'}", "--out", str(out)]
    assert _run("--model", result.export.path, "--data", "tfds:tiny_reviews:test", *where) == 0
    m = json.loads((_folder(out) / "metrics.json").read_text())
    assert (m["rows"], m["labels"], m["data"]) == (20, ["neg", "pos"], "tfds:tiny_reviews:test")
    assert sum(s["rows"] for s in m["slices"]) == 20
    capsys.readouterr()
    assert _run("--model", result.export.path, "--data", "tfds:tiny_reviews:validation", *where) == 1
    assert _one_line_error(capsys) == ("error: tfds dataset 'tiny_reviews' has no split 'validation' "
                                       "(splits: train, test)")
    assert len(list(out.iterdir())) == 1


def test_the_data_may_name_the_labels_its_own_way(trained_run, tmp_path):
    _, result = trained_run
    table = _labelled(tmp_path / "reviews.tsv", labels=("negative", "positive"), text="review")
    out = tmp_path / "evaluation"
    assert _run("--model", result.export.path, "--data", str(table), "--set", "data.text_column=review",
                "--set", "data.labels=[negative,positive]", "--out", str(out)) == 0
    m = json.loads((_folder(out) / "metrics.json").read_text())
    assert (m["labels"], m["label_names_from"]) == (["negative", "positive"], "data.labels")
    assert {e["label"] for e in m["errors"]} <= {"negative", "positive"}


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and captured.out == "", captured
    return err[0]


@pytest.mark.parametrize("problem", ["missing column", "unknown labels", "missing file", "damaged file",
                                     "missing slice column", "not an export"])
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(trained_run, tmp_path, capsys, problem):
    _, result = trained_run
    model, table = result.export.path, _labelled(tmp_path / "reviews.csv")
    extra = []
    if problem == "missing column":
        table = _labelled(tmp_path / "stars.csv", label="stars")
    elif problem == "unknown labels":
        table = _labelled(tmp_path / "good.csv", labels=("bad", "good"))
    elif problem == "missing file":
        table = tmp_path / "nowhere.csv"
    elif problem == "damaged file":
        table.write_text(table.read_text() + '"an unclosed quote,pos,books\n')
    elif problem == "missing slice column":
        extra = ["--slice-by", "shop"]
    else:
        model = str(tmp_path)
    out = tmp_path / "evaluation"
    assert _run("--model", model, "--data", str(table), "--out", str(out), *extra) == 1
    line = _one_line_error(capsys)
    expected = {
        "missing column": f"error: {table}: no column 'label' (columns found: 'text', 'stars', 'product'); "
                          "set data.label_column",
        "unknown labels": f"error: --data {table}: the label column 'label' holds 'good': 46, 'bad': 44 "
                          "(rows), not the model's labels ['neg', 'pos']: set "
                          "data.labels=[<negative>,<positive>] to the values that mean 'neg' and 'pos'",
        "missing file": f"error: --data: {str(table)!r} does not exist",
        "damaged file": f"error: {table}: line 92: unbalanced quotes: the quoted field that starts here is "
                        "never closed",
        "missing slice column": f"error: {table}: no column 'shop' (columns found: 'text', 'label', "
                                "'product'); check --slice-by",
        "not an export": f"error: no exported model under {tmp_path}: run `make train` (or `make export`) "
                         "first, or pass --model saved_models/<name>[/<N>]",
    }[problem]
    assert line == expected
    assert not out.exists()


def test_length_slices_partition_the_rows():
    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(1, 400, 997), [5, 5, 5]])
    which, names = length_slices(words)
    assert len(names) == 4 and sorted(set(which.tolist())) == [0, 1, 2, 3]  # every row in exactly one
    ranges = [(words[which == g].min(), words[which == g].max()) for g in range(4)]
    assert names == [f"{lo}-{hi} words" for lo, hi in ranges]
    assert all(hi < next_lo for (_, hi), (next_lo, _) in itertools.pairwise(ranges))  # no overlap, in order
    assert max(np.bincount(which)) - min(np.bincount(which)) <= 10  # quartiles: about a quarter each
    same, names = length_slices(np.full(50, 7))
    assert names == ["7-7 words"] and set(same.tolist()) == {0}


def test_column_slices_name_empty_values():
    which, names = column_slices(np.array(["b", "", "a", "b"], dtype=object))
    assert names == ["(empty)", "a", "b"] and which.tolist() == [2, 0, 1, 2]


def _imports(module: str) -> set[str]:
    """The pipeline modules `module` imports at its top level, and theirs, and so on."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                todo += [f"pipeline.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("pipeline.")]
    return seen


def test_evaluate_scores_with_tensorflow_alone():
    loaded = _imports("pipeline.evaluate") | _imports("pipeline.evaluate_report")  # what `evaluate` runs
    assert "pipeline.predict" in loaded and "pipeline.stats" in loaded
    assert not loaded & {"pipeline.model", "pipeline.train", "pipeline.export", "pipeline.scoring",
                         "pipeline.vectorize", "pipeline.ngrams"}
