"""The tuning report: what a finished search leaves for people to read, and for `make train`.

From the executions' records (`executions/<key>.json`, `.npz`) it writes `results.csv` (one
row per execution), `results.md` (opening with one plain sentence: which sizes are within
noise of the best, which are worse and by how much, what was picked), `results.png`
(accuracy with its standard error against serving cost), the final `search.json` and, last,
`best_hparams.json`. `pipeline.tune` trains the executions; this module never trains.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.embeddings import neighbours_markdown
from pipeline.runs import read_json, write_json
from pipeline.tune_pick import (
    FULL,
    RANKED_BY,
    SCREEN,
    Execution,
    SizeSummary,
    best_of,
    compare,
    kept_sizes,
    pick,
    points,
    screen_ranking,
    screens,
    sentence,
    summarize,
)
from pipeline.tuned import BEST_FILE, EXECUTIONS_DIR, SEARCH_FILE

SERVED = "val_served_accuracy"  # the BiLSTM blended with the run's n-gram branch
CSV_COLUMNS = ("embedding_dim", "stage", "execution", "seed", "epochs", RANKED_BY, SERVED, "best_epoch",
               "epochs_run", "trainable_params", "seconds", "run_dir")


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    role: str  # single, chief or worker
    session: list[dict]  # executions this process ran: key and status
    pick: dict | None  # the picked size and the opening sentence (None on a worker or with no pick)
    sizes: list[dict] | None = None  # per compared size: mean, se, paired comparison, cost


def execution_records(out: Path, dims: list[int] | None = None) -> list[dict]:
    """The finished executions' records (of the candidate sizes `dims`, if given)."""
    records = [json.loads(f.read_text()) for f in sorted((out / EXECUTIONS_DIR).glob("*d-*-*.json"))
               if not f.name.endswith(".neighbours.json")]
    records = [r for r in records if dims is None or r["embedding_dim"] in dims]
    return sorted(records, key=lambda r: (r["stage"] != SCREEN, r["embedding_dim"], r["execution"]))


def _correct(out: Path, key: str) -> np.ndarray:
    """An execution's per-review right/wrong, the BiLSTM alone's (what the sizes are ranked on)."""
    with np.load(out / EXECUTIONS_DIR / f"{key}.npz") as z:
        return (z["lstm"] > 0.5) == z["labels"]


def screen_correct(out: Path, scores: dict[int, float | None]) -> dict[int, np.ndarray]:
    """The screens' per-review right/wrong, of the screened sizes with a score and their file."""
    keys = {d: Execution(d, 0, SCREEN).key for d, s in scores.items() if s is not None}
    return {d: _correct(out, k) for d, k in keys.items() if (out / EXECUTIONS_DIR / f"{k}.npz").exists()}


def best_runs(records: list[dict]) -> dict[int, dict]:
    """Per size, its best execution: a full one when there is one, else its screen."""
    out: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: (r["stage"] == FULL, r[RANKED_BY])):
        out[r["embedding_dim"]] = r
    return out


def write_report(cfg: Config, out: Path, session: list[dict], failed: list[dict],
                 costs_of: Callable[[dict[int, str]], dict[int, dict]], who: str = "single") -> TuneResult:
    """results.csv / .md / .png, search.json and best_hparams.json from the records in `out`.

    `costs_of`: size -> run folder to size -> serving cost (measured by `pipeline.tune`).
    """
    records = execution_records(out, list(cfg.tune.embedding_dims))
    _write_csv(records, out / "results.csv")
    summaries = summarize(records)
    info = read_json(out / SEARCH_FILE) | {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "executions": len(records),
        "this_session": session, "failed": failed}
    if not summaries:
        write_json(out / SEARCH_FILE, info | {"status": "no size has two finished full executions"})
        return TuneResult(out, who, session, None)

    full = {s.dim: [_correct(out, r["key"]) for r in records
                    if r["embedding_dim"] == s.dim and r["stage"] == FULL] for s in summaries}
    best = best_of(summaries)
    comparisons = compare(full, best.dim)
    chosen = pick(summaries, cfg.tune.pick)
    best_of_size = best_runs(records)
    costs = costs_of({d: r["run_dir"] for d, r in best_of_size.items()})
    sizes = [_size_row(s, comparisons.get(s.dim), costs.get(s.dim), best_of_size[s.dim])
             for s in summaries]
    screen = _screen_rows(cfg, out, records, costs, best_of_size)
    dropped = {r["embedding_dim"]: r[RANKED_BY] for r in screen if not r["kept"] and not r["gave_way"]}
    kept_floor = min((r[RANKED_BY] for r in screen if (r["kept"] and not r["preferred"]) or r["gave_way"]),
                     default=None)
    given, gave_way = [r["embedding_dim"] for r in screen if r["gave_way"]], None
    if given:
        preferred = next(r["embedding_dim"] for r in screen if r["preferred"])
        screen_best = screen_ranking({r["embedding_dim"]: r[RANKED_BY] for r in screen})[0]
        gave_way = (given, preferred, screen_best)
    opening = sentence(summaries, chosen, cfg.tune.pick, comparisons, dropped, kept_floor, gave_way)

    _plot(sizes, chosen.dim, out / "results.png")
    atomic.write_text(out / "results.md", _markdown(cfg, opening, sizes, screen, records, out, best_of_size))
    picked = {"embedding_dim": chosen.dim, "mean": chosen.mean, "se": chosen.se, "executions": chosen.n,
              "rule": cfg.tune.pick, "sentence": opening}
    write_json(out / SEARCH_FILE, info | {"status": "finished", "pick": picked, "sizes": sizes,
                                          "screen": screen})
    # Written last: its presence means the report above is complete.
    write_json(out / BEST_FILE, {"values": {"embedding_dim": chosen.dim}, "rule": cfg.tune.pick,
                                 "mean": chosen.mean, "se": chosen.se, "executions": chosen.n,
                                 "finished": info["finished"]})
    return TuneResult(out, who, session, picked, sizes)


def _write_csv(records: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _size_row(s: SizeSummary, comparison: dict | None, cost: dict | None, best_run: dict) -> dict:
    return asdict(s) | {"versus_best": comparison, "trainable_params": best_run.get("trainable_params"),
                        **{k: (cost or {}).get(k) for k in ("export_mb", "reviews_per_s", "latency_ms_p50")}}


def _screen_rows(cfg: Config, out: Path, records: list[dict], costs: dict[int, dict],
                 best_of_size: dict[int, dict]) -> list[dict]:
    """The screen's scores, which sizes it kept, and what the dropped ones cost to serve.

    `preferred`: kept as the configured size within noise of the best, out of its rank;
    `gave_way`: dropped for it, though its screening score ranked it among the kept.
    """
    if not screens(cfg.tune):
        return []
    scores = {r["embedding_dim"]: r[RANKED_BY] for r in records if r["stage"] == SCREEN}
    by_rank, kept = [], []
    if len(scores) == len(cfg.tune.embedding_dims):
        by_rank = kept_sizes(cfg.tune, scores)
        kept = kept_sizes(cfg.tune, scores, cfg.model.embedding_dim, screen_correct(out, scores))
    return [{"embedding_dim": d, RANKED_BY: scores[d], "kept": d in kept,
             "preferred": d in kept and d not in by_rank, "gave_way": d in by_rank and d not in kept,
             "trainable_params": best_of_size[d].get("trainable_params"),
             **{k: costs.get(d, {}).get(k) for k in ("export_mb", "reviews_per_s", "latency_ms_p50")}}
            for d in sorted(scores)]


def _kept_cell(row: dict) -> str:
    if row["preferred"]:
        return "yes, the configured size"
    return "no, gave way to the configured size" if row["gave_way"] else "yes" if row["kept"] else "no"


def _cost_cells(row: dict) -> str:
    def show(v, fmt):
        return "" if v is None else format(v, fmt)
    return (f"{show(row['trainable_params'], ',')} | {show(row['export_mb'], '.1f')} | "
            f"{show(row['reviews_per_s'], ',.0f')} | {show(row['latency_ms_p50'], '.1f')}")


def _versus(c: dict | None) -> str:
    """A paired difference in points with its interval, or `best`."""
    return "best" if c is None else f"{points(c['difference'])} [{points(c['low'])}, {points(c['high'])}]"


def _markdown(cfg: Config, opening: str, sizes: list[dict], screen: list[dict], records: list[dict],
              out: Path, best_of_size: dict[int, dict]) -> str:
    n_val = records[0]["validation_reviews"]
    lines = [f"# Tuning {cfg.name}: the embedding size", "", opening, "",
             f"Each size trained as `make train` trains it (the same data, teacher and schedule, up to "
             f"{cfg.train.epochs} epochs), with seeds {cfg.seed}, {cfg.seed + 1}, ...; scored on the "
             f"same {n_val:,} validation reviews (never the test split). Mean ± standard error over "
             "the executions; *versus best*: the paired difference on the same reviews (execution k "
             "against the best size's execution k), with its 95% bootstrap interval and McNemar's p. "
             "Serving cost: the exported SavedModel of the size's best execution, on this machine.",
             "",
             "| dim | executions | BiLSTM val accuracy | served val accuracy | versus best (points) | p "
             "| trainable params | export MB | reviews/s (batch 256) | p50 ms, one short review |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sizes:
        c = row["versus_best"]
        versus, p = _versus(c), "" if c is None else f"{c['p']:.2g}"
        served = "" if row["served_mean"] is None else points(row["served_mean"])
        mean = f"{points(row['mean'])} ± {points(row['se'])}"
        cells = [str(row["dim"]), str(row["n"]), mean, served, versus, p, _cost_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if screen:
        lines += ["", f"**Screen.** Every size first trained {cfg.tune.screen_epochs} epoch(s), seed "
                  f"{cfg.seed}, the BiLSTM alone; the {cfg.tune.keep} best went on to full executions "
                  "(successive halving), the configured size among them when its paired interval "
                  "against the best held no difference. A dropped size's cost is that of its screen "
                  "model, without the n-gram branch.", "",
                  "| dim | screen BiLSTM val accuracy | kept | trainable params | export MB | reviews/s "
                  "| p50 ms |",
                  "|---:|---:|:---:|---:|---:|---:|---:|"]
        lines += [f"| {r['embedding_dim']} | {points(r[RANKED_BY])} | {_kept_cell(r)} | "
                  f"{_cost_cells(r)} |" for r in screen]
    lines += ["", "![BiLSTM validation accuracy, mean ± standard error, against serving throughput]"
              "(results.png)", "", "Every execution: `results.csv`.", ""]
    neighbours = {f"{d}-d": read_json(out / EXECUTIONS_DIR / f"{r['key']}.neighbours.json")
                  for d, r in sorted(best_of_size.items())
                  if (out / EXECUTIONS_DIR / f"{r['key']}.neighbours.json").is_file()}
    if neighbours:
        lines += ["## What each embedding learned", "",
                  "The five nearest words (cosine) to each probe word in the trained embedding of each "
                  "size's best execution.", "", neighbours_markdown(neighbours), ""]
    return "\n".join(lines)


def _plot(sizes: list[dict], chosen: int, path: Path) -> None:
    """BiLSTM validation accuracy ± one standard error against reviews/s served, one point a size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in sizes:
        x = row["reviews_per_s"] or 0.0
        picked = {"color": "tab:red", "marker": "*", "markersize": 14}
        style = picked if row["dim"] == chosen else {"marker": "o"}
        ax.errorbar([x], [100 * row["mean"]], yerr=[100 * row["se"]], capsize=4, linestyle="none", **style)
        ax.annotate(f"{row['dim']}-d", (x, 100 * row["mean"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("served reviews/s at batch 256 (higher is cheaper)")
    ax.set_ylabel("BiLSTM val accuracy, % (mean ± SE)")
    ax.set_title(f"accuracy against serving cost per embedding size (picked: {chosen}-d)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # savefig picks the format by extension
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def summary(result: TuneResult) -> str:
    """What a person reads at the end: the sentence, the sizes, where the files are."""
    out = result.out_dir
    if result.role == "worker":
        ran = ", ".join(f"{t['key']} {t['status']}" for t in result.session)
        return (f"ran {len(result.session)} execution(s){': ' + ran if ran else ''}; "
                "the chief writes the report")
    lines = ["", result.pick["sentence"], ""]
    for row in result.sizes:
        c = row["versus_best"]
        versus = "the best" if c is None else f"versus the best {_versus(c)}"
        lines.append(f"  {row['dim']:>4}-d  {points(row['mean'])} ± {points(row['se'])}  {versus}  "
                     f"({row['n']} executions)")
    lines += ["", f"report: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}",
              f"picked: {out / BEST_FILE}  (make train TUNED=latest)"]
    return "\n".join(lines)
