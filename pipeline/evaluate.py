"""`imdb-pipeline evaluate`: how an export does on any labelled set, before it is served.

An export (and, with `--against`, a second one) is scored through its SavedModel alone,
with TensorFlow only, as `pipeline.predict` scores. `--data` is a CSV, TSV or JSONL file or
glob, read by `pipeline.tables` with the training keys `data.text_column`,
`data.label_column` and `data.labels`, or `tfds:NAME[:SPLIT]` (split `test` unless named).
Rows are read and scored a chunk at a time, so only their probabilities, lengths and label
codes are held, never the texts.

`evaluate` returns everything metrics.json holds; `pipeline.evaluate_report` writes it out.
The figures and their intervals come from `pipeline.stats`.
"""

from __future__ import annotations

import heapq
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import data as data_mod
from pipeline import predict, stats, table_files, tables
from pipeline.config import DataConfig
from pipeline.constants import THRESHOLD
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"  # --data tfds:imdb_reviews:test; a file path never starts with a scheme like this
DEFAULT_SPLIT = "test"
CHUNK = 8192  # rows read and scored at a time; sorted by length within, so batches carry little padding
ERRORS = 20  # most confident wrong predictions kept
ERROR_CHARS = 300  # each shortened to this
_KEY = "<data>"  # what pipeline.tables is told the rows came from; its messages then say --data
_SLICE_KEY = "<slice>"


class EvaluateError(PipelineError):
    """Rows or models that cannot be evaluated as asked; one line that says what to set."""


@dataclass
class Rows:
    """A labelled set, read a chunk at a time: the same interface for files and tfds."""

    source: str  # as given to --data
    total: int | None  # rows, where known before reading
    chunks: Iterator[tuple[list[str], list[str]]]  # (texts, label values) per chunk, in order
    values: dict[str, int | None]  # the label values it can hold, with their rows where known
    label_column: str  # where the values come from, for messages
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # --slice-by column: value per row


def _flagged(exc: tables.TableError) -> EvaluateError:
    # pipeline.tables names the config key a pattern came from (data.<key>); here it is a flag.
    text = str(exc).replace(f"data.{_KEY}", "--data").replace(f"set data.{_SLICE_KEY}", "check --slice-by")
    return EvaluateError(text)


def file_rows(pattern: str, cfg: DataConfig, slice_by: list[str]) -> Rows:
    """Rows of CSV/TSV/JSONL files: every row checked in one streamed pass first (as training
    checks them), then read again a chunk at a time."""
    try:
        paths = table_files.expand(pattern, _KEY)
        table = tables.scan(paths, cfg.text_column, cfg.label_column, cfg.skip_bad_rows, _KEY)
        columns = {c: np.asarray(list(tables.read_column(table, c, _SLICE_KEY)), dtype=object)
                   for c in slice_by}
    except tables.TableError as exc:
        raise _flagged(exc) from None

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        for start in range(0, len(table), CHUNK):
            rows = np.arange(start, min(start + CHUNK, len(table)))
            yield list(tables.read_texts(table, rows)), [table.values[c] for c in table.codes[rows]]

    return Rows(pattern, len(table), chunks(), table.label_counts(), cfg.label_column, columns)


def tfds_rows(spec: str, cfg: DataConfig, slice_by: list[str]) -> Rows:
    """Rows of a tfds split (`tfds:NAME[:SPLIT]`); labels are the ClassLabel's names."""
    import tensorflow as tf

    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    if not name:
        raise EvaluateError(f"--data {spec!r}: name the dataset, e.g. tfds:imdb_reviews:test")
    if slice_by:
        raise EvaluateError("--slice-by: only for files; a tfds set is sliced by length alone")
    cfg = cfg.model_copy(update={"tfds_name": name})
    ds, names, total, label_key = data_mod.tfds_split(cfg, split or DEFAULT_SPLIT)

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        try:
            for texts, labels in ds.batch(CHUNK).as_numpy_iterator():
                yield ([t.decode("utf-8", "replace") for t in texts],
                       [names[y] if names else str(y) for y in labels.tolist()])
        except tf.errors.OpError as exc:
            raise data_mod.DataError(f"cannot read {spec}: {exc.message.splitlines()[0]}; prepare "
                                     "the dataset again or restore its files") from None

    return Rows(spec, total, chunks(), dict.fromkeys(names) if names else {}, label_key)


def open_rows(data: str, cfg: DataConfig, slice_by: list[str]) -> Rows:
    return (tfds_rows if data.startswith(TFDS_PREFIX) else file_rows)(data, cfg, slice_by)


# --- scoring ------------------------------------------------------------------------------------


class _Progress:
    """`scored N / M reviews` on stderr, rewritten in place; only on a terminal."""

    def __init__(self, total: int | None):
        self.total, self.done, self.on = total, 0, sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done += n
        if self.on:
            of = f" / {self.total}" if self.total else ""
            print(f"\rscored {self.done}{of} reviews", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on and self.done:
            print(file=sys.stderr)


@dataclass
class Scored:
    """What scoring keeps of every row: its label value, length and each model's probability."""

    values: list[str]  # label values found, in order of first appearance
    codes: np.ndarray  # per row: index into values
    words: np.ndarray  # per row: whitespace-separated words
    probabilities: list[np.ndarray]  # per model
    sides: list[dict[bool, str]]  # per model: the name its `label` output gave at p >= 0.5 (True) and below
    seconds: list[float]  # per model: time inside the SavedModel
    # The most confident rows of each (label value, side called) of the first model: whichever
    # pairs turn out to be wrong give the errors, once the names are known.
    confident: dict[tuple[str, bool], list] = field(default_factory=dict)


def score_rows(rows: Rows, serves: list) -> Scored:
    """Every row through every model's `serving_default`, a chunk at a time."""
    values: dict[str, int] = {}
    codes, words, probabilities = [], [], [[] for _ in serves]
    sides: list[dict[bool, str]] = [{} for _ in serves]
    seconds = [0.0 for _ in serves]
    confident: dict[tuple[str, bool], list] = {}
    progress, seen = _Progress(rows.total), 0
    try:
        for texts, labels in rows.chunks:
            for i, serve in enumerate(serves):
                t0 = time.perf_counter()
                p, names = predict.score(serve, texts)
                seconds[i] += time.perf_counter() - t0
                probabilities[i].append(p)
                for v, name in zip(p.tolist(), names, strict=True):
                    sides[i].setdefault(v >= THRESHOLD, name)
            codes.append(np.array([values.setdefault(v, len(values)) for v in labels], dtype=np.int64))
            words.append(np.array([len(t.split()) for t in texts], dtype=np.int64))
            p = probabilities[0][-1]
            for j, (text, value) in enumerate(zip(texts, labels, strict=True)):
                heap = confident.setdefault((value, bool(p[j] >= THRESHOLD)), [])
                item = (abs(float(p[j]) - THRESHOLD), -(seen + j), text[:ERROR_CHARS], float(p[j]))
                (heapq.heappush if len(heap) < ERRORS else heapq.heappushpop)(heap, item)
            seen += len(texts)
            progress.add(len(texts))
    finally:
        progress.close()
    if not seen:
        raise EvaluateError(f"--data {rows.source}: no rows")
    return Scored(list(values), np.concatenate(codes), np.concatenate(words),
                  [np.concatenate(p) for p in probabilities], sides, seconds, confident)


# --- labels -------------------------------------------------------------------------------------


def model_names(recorded: tuple[str, str] | None, sides: dict[bool, str], values: list[str]
                ) -> tuple[tuple[str, str], str]:
    """The (negative, positive) names an export serves, and where they were read.

    Its labels file (`recorded`), when the export has one; else its `label` output as scored
    (the name at p >= 0.5 is the positive one), a side no row reached taken from the data's
    other value.
    """
    if recorded is not None:
        return recorded, "the export's labels file"
    negative, positive = sides.get(False), sides.get(True)
    rest = [v for v in values if v not in (negative, positive)]
    negative = negative or (rest[0] if rest else "neg")
    positive = positive or (rest[0] if rest else "pos")
    return (negative, positive), "the export's label output"


def label_lookup(values: dict[str, int | None], names: tuple[str, str], given: tuple[str, str] | None,
                 source: str, column: str) -> np.ndarray:
    """0/1 per label value (`values`: value -> rows, where known): the data's values mapped onto
    the model's negative and positive.

    `given` (data.labels) says which values mean negative and positive; without it the values
    must be the model's own names. Any other value is an error naming the values found.
    """
    expect = given or names
    if any(v not in expect for v in values):
        found = ", ".join(repr(v) + (f": {n}" if n is not None else "") for v, n in values.items())
        counted = " (rows)" if all(n is not None for n in values.values()) else ""
        if given:
            raise EvaluateError(f"--data {source}: the label column {column!r} holds {found}{counted}, "
                                f"not only data.labels {list(given)}")
        raise EvaluateError(f"--data {source}: the label column {column!r} holds {found}{counted}, not "
                            f"the model's labels {list(names)}: set data.labels=[<negative>,<positive>] "
                            f"to the values that mean {names[0]!r} and {names[1]!r}")
    return np.array([expect.index(v) for v in values], dtype=np.int64)


# --- slices -------------------------------------------------------------------------------------


def length_slices(words: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each row's length quartile (fewer groups where quartiles coincide) and the groups' names.

    Every row falls in exactly one group; empty groups are dropped.
    """
    edges = np.unique(np.quantile(words, [0.25, 0.5, 0.75])) if len(words) else np.zeros(0)
    which = np.searchsorted(edges, words, side="left")
    kept = [g for g in range(len(edges) + 1) if np.any(which == g)]
    renumber = np.full(len(edges) + 1, -1)
    renumber[kept] = np.arange(len(kept))
    names = [f"{words[which == g].min()}-{words[which == g].max()} words" for g in kept]
    return renumber[which], names


def column_slices(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each row's group by its value in a column, and the groups' names ("(empty)" for none)."""
    names, which = np.unique(np.asarray([v or "(empty)" for v in values], dtype=object).astype(str),
                             return_inverse=True)
    return which, names.tolist()


def slice_table(slicing: str, which: np.ndarray, names: list[str], correct: list[np.ndarray]) -> list[dict]:
    """Rows, accuracy and Wilson interval per slice (and, with a second model, the paired
    difference), the worst first."""
    out = []
    for g, name in enumerate(names):
        inside = which == g
        n, right = int(inside.sum()), int(correct[0][inside].sum())
        row = {"slicing": slicing, "slice": name, "rows": n, "accuracy": right / n,
               "interval": list(stats.wilson_interval(right, n))}
        if len(correct) > 1:
            row["against"] = stats.paired_difference(correct[0][inside], correct[1][inside])
        out.append(row)
    return sorted(out, key=lambda r: (r["accuracy"], -r["rows"]))


# --- the comparison -----------------------------------------------------------------------------


def verdict(cmp: dict, a: str, b: str) -> str:
    """One sentence: which is better by how many points, or no difference beyond noise."""
    half = (cmp["high"] - cmp["low"]) / 2 * 100
    if cmp["p"] >= stats.BEYOND_NOISE:
        return (f"no difference beyond noise ({b} minus {a}: {cmp['difference'] * 100:+.2f} ± {half:.2f} "
                f"points, {stats.p_text(cmp['p'])})")
    better = b if cmp["difference"] > 0 else a
    return (f"{better} is better by {abs(cmp['difference']) * 100:.2f} ± {half:.2f} points "
            f"({stats.p_text(cmp['p'])})")


# --- the whole evaluation -----------------------------------------------------------------------


def evaluate(model: Path, data: str, cfg: DataConfig, against: Path | None = None,
             slice_by: list[str] | None = None, fit_threshold: list[str] | None = None) -> dict:
    """Score `model` (and `against`) on `data`; everything metrics.json holds."""
    slice_by, fit_threshold = slice_by or [], fit_threshold or []
    paths = [predict.resolve_version(m) for m in (model, against) if m is not None]  # before reading data
    rows = open_rows(data, cfg, slice_by)
    given = cfg.label_names()
    recorded = [predict.label_names(p) for p in paths]
    if recorded[0] is not None:  # then a wrong label value is found now, not after scoring
        label_lookup(rows.values, recorded[0], given, rows.source, rows.label_column)
    loaded = [predict.load(p) for p in paths]
    scored = score_rows(rows, [serve for _, serve in loaded])

    found = [model_names(r, sides, scored.values) for r, sides in zip(recorded, scored.sides, strict=True)]
    names, names_from = found[0]
    if len(found) > 1 and given is None and found[1][0] != names:
        raise EvaluateError(f"--against {paths[1]} serves the labels {list(found[1][0])}, {paths[0]} "
                            f"{list(names)}: set data.labels=[<negative>,<positive>] to compare them")
    counts = np.bincount(scored.codes, minlength=len(scored.values)).tolist()
    lookup = label_lookup(dict(zip(scored.values, counts, strict=True)), names, given, rows.source,
                          rows.label_column)
    y = lookup[scored.codes]
    shown = given or names  # the user's names: the data's values when data.labels maps them
    correct = [(p >= THRESHOLD) == (y == 1) for p in scored.probabilities]

    result = {"model": str(paths[0]), "data": rows.source, "rows": int(y.size), "labels": list(shown),
              "label_names_from": "data.labels" if given else names_from, "threshold": THRESHOLD,
              "metrics": stats.binary_metrics(y, scored.probabilities[0])}
    result["calibration"] = {"bins": stats.reliability_bins(y, scored.probabilities[0]),
                             "ece": result["metrics"]["ece"]["value"]}
    which, group_names = length_slices(scored.words)
    result["slices"] = slice_table("length", which, group_names, correct)
    for column in slice_by:
        which, group_names = column_slices(rows.columns[column])
        result["slices"] += slice_table(column, which, group_names, correct)
    result["thresholds"] = [
        {"metric": m, "threshold": t, "value": v,
         "at_0.5": (stats.f1(y, scored.probabilities[0]) if m == "f1" else float(np.mean(correct[0])))}
        for m in fit_threshold for t, v in [stats.best_threshold(y, scored.probabilities[0], m)]]
    result["errors"] = confident_errors(scored, lookup, shown)
    result["speed"] = [{"model": str(p), "reviews_per_second": round(y.size / s, 1), "seconds": round(s, 2),
                        "batch": predict.BATCH} for p, s in zip(paths, scored.seconds, strict=True)]
    if len(paths) > 1:
        cmp = stats.paired_difference(correct[0], correct[1])
        result["against"] = {"model": str(paths[1]),
                             "metrics": stats.binary_metrics(y, scored.probabilities[1]),
                             "calibration": {"bins": stats.reliability_bins(y, scored.probabilities[1])},
                             "comparison": cmp, "sentence": verdict(cmp, str(paths[0]), str(paths[1]))}
    return result


def confident_errors(scored: Scored, lookup: np.ndarray, shown: tuple[str, str]) -> list[dict]:
    """The most confident wrong predictions of the first model, most confident first; `row` is
    the row's place (from 0) among the rows scored."""
    truth = {v: int(lookup[i]) for i, v in enumerate(scored.values)}
    wrong = [item + (value,) for (value, called), heap in scored.confident.items()
             if truth[value] != int(called) for item in heap]
    wrong.sort(key=lambda item: (-item[0], -item[1]))
    return [{"row": -order, "text": text, "label": shown[truth[value]], "predicted": shown[1 - truth[value]],
             "probability": p} for _, order, text, p, value in wrong[:ERRORS]]
