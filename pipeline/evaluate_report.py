"""What `imdb-pipeline evaluate` leaves: `<out>/<time>/` with `metrics.json` (everything
`pipeline.evaluate.evaluate` returns), `report.md` (the same to read) and `calibration.png`,
built in a hidden folder beside it and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pipeline import stats
from pipeline.evaluate import ERRORS

SHOWN_SLICES = 20  # slices per slicing in report.md (all of them are in metrics.json)


METRICS = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1", "auc": "AUC",
           "log_loss": "log loss", "brier": "Brier score", "ece": "expected calibration error"}


def _interval(m: dict) -> str:
    low, high = m["interval"]
    return f"{m['value']:.4f} ({low:.4f}-{high:.4f})"


def report(result: dict) -> str:
    """report.md: the figures of metrics.json, to read."""
    m, neg, pos = result["metrics"], *result["labels"]
    c = m["confusion"]
    lines = [f"# Evaluation of {result['model']}", "",
             f"On `{result['data']}`: {result['rows']} rows; labels {neg!r} (negative) and {pos!r} "
             f"(positive), from {result['label_names_from']}; threshold {result['threshold']}. "
             "Intervals are 95%: Wilson for accuracy, precision and recall, a bootstrap of the rows "
             f"({stats.RESAMPLES} resamples) for the rest.", "",
             "| metric | value (95% interval) | rows |", "| --- | --- | --- |"]
    for key, label in METRICS.items():
        lines.append(f"| {label} | {_interval(m[key])} | {m[key]['rows']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              f"| | {neg} | {pos} |", "| --- | --- | --- |",
              f"| **{neg}** | {c['tn']} | {c['fp']} |", f"| **{pos}** | {c['fn']} | {c['tp']} |"]
    if "against" in result:
        a = result["against"]
        lines += ["", f"## Against {a['model']}", "", f"**{a['sentence']}.**", "",
                  "| metric | this model | the other |", "| --- | --- | --- |"]
        lines += [f"| {label} | {_interval(m[k])} | {_interval(a['metrics'][k])} |"
                  for k, label in METRICS.items()]
        lines += ["", "The difference is the other's accuracy minus this one's on the same rows, with "
                  "a paired bootstrap interval and an exact McNemar p."]
    lines += ["", "## Slices, worst first", ""]
    for slicing in dict.fromkeys(s["slicing"] for s in result["slices"]):
        group = [s for s in result["slices"] if s["slicing"] == slicing]
        paired = "against" in group[0]
        lines += [f"By {slicing}" + (" (quartiles of whitespace-separated words)" if slicing == "length"
                                     else "") + ":", "",
                  "| slice | rows | accuracy (95% interval) |" + (" other minus this (points) | p |" if paired
                                                                 else ""),
                  "| --- | --- | --- |" + (" --- | --- |" if paired else "")]
        for s in group[:SHOWN_SLICES]:
            accuracy = _interval({"value": s["accuracy"], "interval": s["interval"]})
            row = f"| {s['slice']} | {s['rows']} | {accuracy} |"
            if paired:
                d = s["against"]
                row += (f" {d['difference'] * 100:+.2f} ({d['low'] * 100:+.2f} to {d['high'] * 100:+.2f}) "
                        f"| {d['p']:.2g} |")
            lines.append(row)
        if len(group) > SHOWN_SLICES:
            lines.append(f"\n{len(group) - SHOWN_SLICES} more in metrics.json.")
        lines.append("")
    lines += ["## Calibration", "", f"Expected calibration error {m['ece']['value']:.4f} over "
              f"{stats.BINS} equal-width bins of P({pos}); the reliability diagram is calibration.png.", "",
              "| P(positive) | rows | mean probability | share positive |", "| --- | --- | --- | --- |"]
    for b in result["calibration"]["bins"]:
        if b["rows"]:
            lines.append(f"| {b['low']:.1f}-{b['high']:.1f} | {b['rows']} | {b['mean_probability']:.3f} | "
                         f"{b['positive_rate']:.3f} |")
    for t in result["thresholds"]:
        lines += ["", f"On these rows, {t['metric']} is highest ({t['value']:.4f}, against "
                  f"{t['at_0.5']:.4f} at 0.5) with threshold {t['threshold']:.4f}. The export is "
                  f"unchanged: it still calls {pos!r} from 0.5."]
    lines += ["", f"## The {ERRORS} most confident wrong predictions", "",
              "| row | true | predicted | P(positive) | text |", "| --- | --- | --- | --- | --- |"]
    for e in result["errors"]:
        text = e["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {e['row']} | {e['label']} | {e['predicted']} | {e['probability']:.4f} | {text} |")
    lines += ["", "## Speed", ""]
    lines += [f"- {s['model']}: {result['rows']} reviews in {s['seconds']} s, "
              f"{s['reviews_per_second']:.0f} reviews/s (batches of {s['batch']}, similar lengths together)"
              for s in result["speed"]]
    return "\n".join(lines) + "\n"


def plot_calibration(result: dict, out_png: Path) -> None:
    """The reliability diagram: mean probability against share positive per bin, and the rows per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    curves = [(result["model"], result["calibration"]["bins"])]
    if "against" in result:
        curves.append((result["against"]["model"], result["against"]["calibration"]["bins"]))
    for name, bins in curves:
        full = [b for b in bins if b["rows"]]
        top.plot([b["mean_probability"] for b in full], [b["positive_rate"] for b in full], "o-", label=name)
        bottom.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["rows"] for b in bins],
                   width=0.09 / len(curves), alpha=0.6)
    top.set_ylabel(f"share {result['labels'][1]}")
    top.set_title(f"reliability on {result['data']} (ECE {result['metrics']['ece']['value']:.4f})")
    top.legend(fontsize=7)
    bottom.set_xlabel(f"predicted P({result['labels'][1]})")
    bottom.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write(result: dict, out: Path) -> Path:
    """`<out>/<time>/` with metrics.json, report.md and calibration.png, all or nothing."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".tmp-{stamp}-{os.getpid()}"
    try:
        work.mkdir()
        plot_calibration(result, work / "calibration.png")
        (work / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (work / "report.md").write_text(report(result), encoding="utf-8")
        target, suffix = out / stamp, 1
        while True:
            try:  # rename() refuses a non-empty target: two evaluations in one second get .1, .2, ...
                os.rename(work, target)
                return target
            except OSError:
                if not target.exists():
                    raise
            target, suffix = out / f"{stamp}.{suffix}", suffix + 1
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
