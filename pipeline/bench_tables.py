"""`imdb-pipeline bench-tables`: what the check of a user's files costs before training.

Writes a large CSV of review-length rows and a file of short rows, then measures, each in a
fresh process so that the peak is the scan's own: `tables.scan` (the one pass that checks
and counts every row), its peak memory above the process's baseline, and for scale one
plain `csv.reader` pass over the same file and one pass that only reads its bytes. No
TensorFlow: the scan uses none.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline import atomic

WORDS = ("film movie plot actor scene great dull boring wonderful story director script music "
         "ending character funny slow brilliant awful cast the a and of to is it was").split()

# Run in a child process: argv = path, what ("scan", "csv" or "bytes"). Prints JSON.
_CHILD = """
import csv, json, resource, sys, time  # importing pipeline.tables lifts csv's field limit
from pathlib import Path
from pipeline import tables
path, what = Path(sys.argv[1]), sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if what == "scan":
    rows = len(tables.scan([path], "text", "label", False, "train_files"))
elif what == "bytes":
    with path.open("rb") as f:
        rows = sum(chunk.count(b"\\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1
else:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": rows, "seconds": seconds, "peak_above_baseline_mib": (peak - base) / 1024}))
"""


def write_csv(path: Path, words_per_row: int, target_bytes: int | None = None, max_rows: int | None = None,
              seed: int = 0) -> int:
    """A CSV of `text,label` rows of about `words_per_row` words (quoted, with a comma and quotes
    inside), up to `target_bytes` or `max_rows`; returns its rows."""
    rng = random.Random(seed)
    rows, size = 0, 0
    with path.open("w", newline="") as f:
        f.write("text,label\n")
        while (target_bytes is None or size < target_bytes) and (max_rows is None or rows < max_rows):
            text = " ".join(rng.choices(WORDS, k=words_per_row))
            line = f'"{text}, said ""someone""",{"pos" if rows % 2 else "neg"}\n'
            f.write(line)
            size += len(line)
            rows += 1
    return rows


def measure(path: Path, what: str) -> dict:
    """One pass over `path` in a fresh process: rows, seconds and peak memory above its baseline."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), what], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


def run(size_mb: float, short_rows: int, folder: Path | None = None) -> dict:
    """Both files' figures: the scan beside one plain csv pass."""
    results = {}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for name, size, rows, words in (("reviews", int(size_mb * 2**20), None, 230),
                                        ("short rows", None, short_rows, 4)):
            path = Path(tmp) / f"{name.replace(' ', '_')}.csv"
            written = write_csv(path, words, size, rows)
            # The byte pass first: it brings the new file into the page cache, so that the scan
            # and the csv pass after it are timed alike, neither paying for the disk.
            raw = measure(path, "bytes")
            scan, plain = measure(path, "scan"), measure(path, "csv")
            if scan["rows"] != written:
                raise RuntimeError(f"the scan counted {scan['rows']} rows of {written}")
            results[name] = {"bytes": path.stat().st_size, "rows": written, "scan": scan, "csv_pass": plain,
                             "byte_pass": raw,
                             "scan_over_two_csv_passes": round(scan["seconds"] / (2 * plain["seconds"]), 3)}
    return results


def markdown_table(results: dict) -> str:
    lines = ["| file | size | rows | scan | one csv pass | scan / two csv passes | one pass of bytes alone "
             "| scan's peak above baseline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['bytes'] / 2**20:,.0f} MiB | {r['rows']:,} | "
                     f"{r['scan']['seconds']:.1f} s | {r['csv_pass']['seconds']:.1f} s | "
                     f"{r['scan_over_two_csv_passes']:.2f} | {r['byte_pass']['seconds']:.1f} s | "
                     f"{r['scan']['peak_above_baseline_mib']:,.0f} MiB |")
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> None:
    atomic.write_text(path, json.dumps(results, indent=2) + "\n")
