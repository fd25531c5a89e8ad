"""The tuning report: what a finished search leaves for people to read.

From the oracle's trials it writes `results.csv` / `results.md` / `results.png` (the
ranked table and its plot), the TensorBoard HParams experiment, the final
`search.json` and, last, `best_hparams.json`; and the summary `make tune` prints.
`pipeline/tune.py` runs the search and calls `write_report`; this module knows nothing
of how trials are trained.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import keras_tuner as kt
import tensorflow as tf

from pipeline import atomic
from pipeline.atomic import atomic_path
from pipeline.config import Config
from pipeline.embeddings import neighbours_markdown
from pipeline.runs import read_json, write_json

# Shared with tune.py, which imports them from here: the report never imports the search.
OBJECTIVE = "val_accuracy"  # the BiLSTM's alone: what the search ranks by (docs/tuning.md)
SERVED = "val_served_accuracy"  # the BiLSTM blended with the n-gram branch, at the same epoch
BEST_FILE = "best_hparams.json"
SEARCH_FILE = "search.json"
LOGS_DIR = "logs"
EMBEDDING_DIR = "embedding"  # logs/<trial>/execution0/embedding: projector files, neighbours.json
NEIGHBOURS_FILE = "neighbours.json"


@dataclass(frozen=True)
class TuneResult:
    out_dir: Path
    role: str  # single, chief or worker
    tuner_id: str
    space: dict[str, list]  # searched name -> candidates
    rows: list[dict]  # finished trials among the current candidates, best first (empty on a worker)
    trained: list[dict]  # trials this process ran in this session: trial_id, values, status
    failed: list[dict]  # trials that failed: trial_id, values, message

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows else None


def _metric(trial: kt.engine.trial.Trial, name: str) -> float | None:
    return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None


def _in_space(values: dict, space: dict[str, list]) -> bool:
    names = {k for k in values if not k.startswith("tuner/")}
    return names == set(space) and all(values[k] in space[k] for k in space)


def ranked_rows(oracle: kt.Oracle, space: dict[str, list]) -> list[dict]:
    """One row per finished trial among the current candidates, best first.

    Ranked by val accuracy; a tie goes to the lower val loss, then the smaller model.
    """
    rows = []
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        if trial.status != "COMPLETED" or not _in_space(values, space):
            continue
        row = {name: values[name] for name in space}
        row |= {
            "trainable_params": int(_metric(trial, "trainable_params") or 0),
            OBJECTIVE: _metric(trial, OBJECTIVE),
            **({SERVED: _metric(trial, SERVED)} if trial.metrics.exists(SERVED) else {}),
            "val_loss": _metric(trial, "val_loss"),
            "epochs_run": int(_metric(trial, "epochs_run") or 0),
            "best_epoch": int(_metric(trial, "best_epoch") or 0),
            "seconds": round(_metric(trial, "seconds") or 0.0, 1),
            "trial_id": trial.trial_id,
        }
        rows.append(row)
    rows.sort(key=lambda r: (-r[OBJECTIVE], r["val_loss"], r["trainable_params"]))
    return [{"rank": i + 1} | r for i, r in enumerate(rows)]


def failed_trials(oracle: kt.Oracle) -> list[dict]:
    out = []
    for trial in oracle.trials.values():
        if trial.status in ("FAILED", "INVALID"):
            lines = (trial.message or "").strip().splitlines()
            out.append({"trial_id": trial.trial_id, "values": dict(trial.hyperparameters.values),
                        "message": lines[-1] if lines else "no message"})
    return out


def _fmt(column: str, value) -> str:
    if value is None:  # e.g. the served figure of a trial from before it was recorded
        return ""
    if column in (OBJECTIVE, SERVED, "val_loss"):
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:.1f}"
    if column == "trainable_params":
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    header = [c.replace("_", " ") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def trial_embedding_dir(out: Path, trial_id: str) -> Path | None:
    """A trial's embedding files: logs/<trial>/execution<N>/embedding (KerasTuner's nesting)."""
    return next(iter(sorted((out / LOGS_DIR / trial_id).glob(f"*/{EMBEDDING_DIR}"))), None)


def best_per_size(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """Embedding init -> embedding dim -> its best row (rows are ranked, so the first wins)."""
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r.get("embedding_init", ""), {}).setdefault(r["embedding_dim"], r)
    return out


def neighbours_section(out: Path, rows: list[dict]) -> str:
    """Per embedding init, the probe words' nearest neighbours at each size, side by side."""
    parts = []
    for init, by_dim in best_per_size(rows).items():
        columns = {}
        for dim in sorted(by_dim):
            folder = trial_embedding_dir(out, by_dim[dim]["trial_id"])
            if folder is not None and (folder / NEIGHBOURS_FILE).is_file():
                columns[f"{dim}-d"] = read_json(folder / NEIGHBOURS_FILE)
        if columns:
            title = f"### {init} start\n\n" if init else ""
            parts.append(f"{title}{neighbours_markdown(columns)}")
    if not parts:
        return ""
    return ("## What each embedding learned\n\nThe five nearest words (cosine) to each probe word in "
            "the trained embedding of the best trial of each size.\n\n" + "\n\n".join(parts) + "\n")


def plot_results(rows: list[dict], out_png: Path) -> None:
    """Val accuracy (one line per embedding init) and trainable parameters against embedding dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = best_per_size(rows)
    params_by_dim = {d: r["trainable_params"] for by_dim in curves.values() for d, r in by_dim.items()}
    dims = sorted(params_by_dim)
    params = [params_by_dim[d] for d in dims]
    fig, ax = plt.subplots(figsize=(7, 4))
    for init, by_dim in curves.items():
        xs = sorted(by_dim)
        start = f", {init} start" if init else ""
        ax.plot(xs, [by_dim[d][OBJECTIVE] for d in xs], "o-", label=f"BiLSTM val accuracy{start}")
        served = [by_dim[d].get(SERVED) for d in xs]
        if all(v is not None for v in served):
            ax.plot(xs, served, "s--", label=f"served (with n-grams) val accuracy{start}")
    ax.plot([rows[0]["embedding_dim"]], [rows[0][OBJECTIVE]], "*", color="tab:red", markersize=16,
            label="best")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set_xlabel("embedding dim")
    ax.set_ylabel("val accuracy (best epoch)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(dims, params, "s--", color="tab:gray", label="trainable params")
    ax2.set_ylabel("trainable params", color="tab:gray")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    ax.set_title("validation accuracy and model size against embedding dim")
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:  # savefig picks the format by extension
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_hparams_config(logs: Path, space: dict[str, list]) -> None:
    """The HParams dashboard's experiment: the searched values and the validation metrics (once)."""
    if any(logs.glob("events.out.tfevents*")):
        return
    from tensorboard.plugins.hparams import api as hp_api

    hparams = [hp_api.HParam(name, hp_api.Discrete(values)) for name, values in space.items()]
    metrics = [hp_api.Metric("epoch_accuracy", group="validation", display_name="val accuracy"),
               hp_api.Metric("epoch_loss", group="validation", display_name="val loss")]
    logs.mkdir(parents=True, exist_ok=True)
    with tf.summary.create_file_writer(str(logs)).as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)


def write_report(cfg: Config, oracle: kt.Oracle, result: TuneResult) -> None:
    """results.csv / .md / .png, best_hparams.json, search.json and the HParams experiment."""
    out, rows = result.out_dir, result.rows
    info = read_json(out / SEARCH_FILE)
    info |= {"status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "space": result.space, "epochs_per_trial": cfg.tune.epochs,
             "trials": {"finished": len(rows), "failed": len(result.failed),
                        "all": len(oracle.trials), "this_session": len(result.trained)},
             "failed": result.failed, "best": result.best}
    write_json(out / SEARCH_FILE, info)
    write_hparams_config(out / LOGS_DIR, result.space)
    if not rows:
        return
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = result.best
    chosen = ", ".join(f"{k}={best[k]}" for k in result.space)
    space_text = "; ".join(f"{k} {v}" for k, v in result.space.items())
    atomic.write_text(out / "results.md",
        f"# Tuning {cfg.name}\n\n"
        f"{cfg.tune.tuner} search over {space_text}. Objective: val accuracy on the validation "
        f"split (never the test split), best epoch of each trial; up to {cfg.tune.epochs} epochs "
        f"per trial with early stopping (patience {cfg.train.early_stopping_patience}). Ties go to "
        "the lower val loss, then the smaller model. Seconds: the trial's `fit`.\n\n"
        f"{markdown_table(rows)}\n\n"
        f"Best: **{chosen}** (trial {best['trial_id']}), saved to `{BEST_FILE}`; "
        "`make train TUNED=latest` trains with it.\n\n"
        "![validation accuracy and trainable parameters against embedding size](results.png)\n\n"
        f"{neighbours_section(out, rows)}{projector_line(out, best)}")
    plot_results(rows, out / "results.png")
    # Written last: its presence means the report above is complete.
    hps = oracle.trials[best["trial_id"]].hyperparameters
    write_json(out / BEST_FILE, hps.get_config())


def projector_line(out: Path, best: dict) -> str:
    folder = trial_embedding_dir(out, best["trial_id"])
    if folder is None:
        return ""
    return (f"\nThe best trial's embedding in TensorBoard's Embedding Projector: "
            f"`tensorboard --logdir {folder}` (Projector tab).\n")


def summary(result: TuneResult) -> str:
    """What a person reads at the end: the table, the best value, where the files are."""
    if result.role == "worker":
        ran = ", ".join(f"trial {t['trial_id']} {t['values']} {t['status']}" for t in result.trained)
        return (f"{result.tuner_id}: ran {len(result.trained)} trial(s){': ' + ran if ran else ''}; "
                "the chief writes the report")
    out, best = result.out_dir, result.best
    chosen = ", ".join(f"{k}={best[k]}" for k in result.space)
    counts = f"{len(result.rows)} finished trial(s), " + (
        "run by the workers" if result.role == "chief" else f"{len(result.trained)} trained in this session")
    if result.failed:
        counts += f", {len(result.failed)} failed (see {out / SEARCH_FILE})"
    lines = [
        "", markdown_table(result.rows), "", counts,
        f"best: {chosen}  val_accuracy {best[OBJECTIVE]:.4f}  val_loss {best['val_loss']:.4f}  "
        f"{best['trainable_params']:,} trainable params (trial {best['trial_id']})",
        f"report: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}",
        f"best hyperparameters: {out / BEST_FILE}  (make train TUNED=latest)",
        f"TensorBoard HParams: tensorboard --logdir {out / LOGS_DIR}",
    ]
    return "\n".join(lines)
