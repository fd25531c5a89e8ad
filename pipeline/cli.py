"""Command line: the only module that defines flags. `imdb-pipeline <command> --help`.

Nothing here imports TensorFlow at module level: each command imports its stage inside
its function, so `--help` and a config error come before any stage (and TensorFlow's
start-up) is loaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError, stop_signal
from pipeline.process import handle_stop_signals, restore_signals, setup_logging

log = logging.getLogger("pipeline")

INTERRUPT_HINT = ("interrupted: rerun the same command to resume: training from the last completed "
                  "epoch, or at evaluation and export if training had finished (add --fresh to start "
                  "over)")
TUNE_INTERRUPT_HINT = ("interrupted: rerun the same command to resume; finished trials are kept and the "
                       "interrupted one is rerun (--fresh starts over)")
STDOUT_CLOSED = 141  # 128 + SIGPIPE: what `yes | head -1` leaves for `yes`

def _interrupted(command: str) -> int:
    print(f"\n{TUNE_INTERRUPT_HINT if command == 'tune' else INTERRUPT_HINT}", file=sys.stderr)
    return 128 + (stop_signal() or signal.SIGINT)  # the shell's code for death by that signal


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", "-c", default=default,
                   help=f"YAML config file (default: {default or 'built-in defaults'})")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.epochs=3 (repeatable; several pairs in "
                        "one argument also work, and a value may hold spaces: --set 'name=a b')")
    # Also accepted after the command; SUPPRESS keeps the subparser from resetting the global flag.
    p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                   help="show library INFO logs and TensorFlow's start-up lines")


_KEY = re.compile(r"[A-Za-z_][\w.]*=")  # where a new key=value pair starts


def _overrides(args: argparse.Namespace) -> list[str]:
    """Each --set argument split shell-like into key=value pairs.

    A word that does not start a `key=` continues the previous value, so `--set "name=my model"`
    and `--set "a=1 b=2"` both mean what they say; quotes keep a value's spaces exactly.
    """
    items: list[str] = []
    for arg in args.overrides:
        try:
            words = shlex.split(arg)
        except ValueError as exc:  # e.g. an unmatched quote
            raise ConfigError(f"--set {arg!r}: {exc}") from None
        pairs: list[str] = []
        for word in words:
            if pairs and not _KEY.match(word):
                pairs[-1] += " " + word
            else:
                pairs.append(word)
        items += pairs
    return items


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:8000 (got {text!r})")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imdb-pipeline",
                                     description="Train, tune, export and serve an IMDB sentiment model.")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show library INFO logs and TensorFlow's start-up lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="ingest, vectorize, train, evaluate and export")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run instead of resuming an interrupted one")
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")
    p.add_argument("--tuned", metavar="PATH|latest", default=None,
                   help="train with the best hyperparameters of a tuning: a best_hparams.json, its "
                        "folder, or 'latest' (this config name's); same as --set model.tuned_hparams=...")
    p.add_argument("--force", action="store_true",
                   help="publish the export even if the release gate (export.gate) finds it worse than "
                        "the newest published version")

    p = sub.add_parser("tune", help="search the embedding size with KerasTuner (resumable)")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="discard the earlier trials of this config name and search again")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--chief", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: serve the search on HOST:PORT (e.g. 0.0.0.0:8000) and hand "
                          "trials to workers; the chief trains nothing and writes the report")
    who.add_argument("--worker", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: run the trials handed out by the chief at HOST:PORT")
    p.add_argument("--tuner-id", metavar="NAME", default=None,
                   help="this worker's name (required with --worker): unique among the workers and "
                        "the same on a restart, which then reruns its unfinished trial (e.g. tuner1)")

    p = sub.add_parser("export", help="export the latest finished run again, without retraining")
    _config_args(p)
    p.add_argument("--run", default=None, help="run directory (default: the latest finished run)")
    p.add_argument("--force", action="store_true",
                   help="publish even if the release gate (export.gate) finds it worse than the newest "
                        "published version")

    p = sub.add_parser("pretrain", help="train the config's pretrained start (word2vec vectors or language "
                                        "models) on the unlabelled reviews (cached)")
    _config_args(p)

    p = sub.add_parser("bench", help="time this pipeline against the tutorial-style baseline")
    _config_args(p)
    p.add_argument("--train-examples", type=int, default=5000, help="training reviews both sides see")
    p.add_argument("--test-examples", type=int, default=2000, help="test reviews for accuracy and serving")
    p.add_argument("--epochs", type=int, default=3, help="epochs each side trains (the first warms up)")
    p.add_argument("--json", default="bench_results/bench.json", help="where the figures go")
    p.add_argument("--markdown", default="docs/experiments/speed.md",
                   help="file whose bench table is replaced")
    p.add_argument("--peer-only", action="store_true",
                   help="only the linear peer (TF-IDF bigram logistic regression); 0 examples = all")
    p.add_argument("--peer-json", default="bench_results/peer.json",
                   help="where --peer-only's figures go (make results reads them)")

    p = sub.add_parser("results", help="write RESULTS.md from the finished runs' own records")
    _config_args(p, default="configs/default.yaml")  # the results page is the default run's
    p.add_argument("--runs-dir", default=None, help="where the runs are (default: the config's runs_dir)")
    p.add_argument("--peer-json", default="bench_results/peer.json",
                   help="the linear peer's record (imdb-pipeline bench --peer-only writes it)")
    p.add_argument("--out", default="RESULTS.md", help="the page to write")

    p = sub.add_parser("bench-tables", help="time and measure the check of a large CSV before training "
                                            "(writes scratch files of that size)")
    p.add_argument("--size-mb", type=float, default=1024, help="the review-length CSV's size (default 1 GiB)")
    p.add_argument("--short-rows", type=int, default=1_000_000, help="rows of the short-row CSV")
    p.add_argument("--dir", default=None, help="where the scratch files go (default: the system temp folder)")
    p.add_argument("--json", default="bench_results/tables.json", help="where the figures go")

    p = sub.add_parser("train-workers", help="train with N multi-worker processes on this machine "
                                             "(tries out multi_worker; TF_CONFIG is built for each)")
    _config_args(p)
    p.add_argument("--workers", "-n", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--fresh", action="store_true", help="as for train")
    p.add_argument("--no-export", action="store_true", help="as for train")

    p = sub.add_parser("predict", help="score reviews with an exported model (one JSON line each)")
    _config_args(p)
    p.add_argument("--model", "-m", default=None,
                   help="saved_models/<name> (its newest version) or saved_models/<name>/<N> "
                        "(default: the config's export.dir/name)")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="reviews to score (default: one per non-empty line on stdin)")

    p = sub.add_parser("evaluate", help="score an export on a labelled set: metrics with intervals, "
                                        "slices, calibration, errors (docs/evaluate.md)")
    _config_args(p)
    p.add_argument("--model", "-m", default=None,
                   help="saved_models/<name> (its newest version) or saved_models/<name>/<N> "
                        "(default: the config's export.dir/name)")
    p.add_argument("--data", "-d", required=True, metavar="FILE|GLOB|tfds:NAME[:SPLIT]",
                   help="labelled rows: a CSV/TSV/JSONL file or glob (columns data.text_column and "
                        "data.label_column), or a tfds set, e.g. tfds:imdb_reviews:test")
    p.add_argument("--against", metavar="MODEL", default=None,
                   help="a second export scored on the same rows: the paired difference, per slice too")
    p.add_argument("--slice-by", action="append", default=[], metavar="COLUMN",
                   help="also slice by this column of the file (repeatable); length quartiles always")
    p.add_argument("--fit-threshold", action="append", default=[], choices=("accuracy", "f1"),
                   help="report the threshold that maximizes this on the data (repeatable; the export "
                        "is unchanged)")
    p.add_argument("--out", default="evaluation", help="results go to <out>/<time>/ (default: evaluation)")

    p = sub.add_parser("gpu-check", help="on a GPU machine: cuDNN use, seconds per epoch with and "
                                         "without mixed precision, export served with GPUs hidden")
    _config_args(p)
    p.add_argument("--train-examples", type=int, default=10000, help="training reviews timed (real data)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per leg (the first also traces)")
    p.add_argument("--json", default="bench_results/gpu_check.json", help="figures (and the table as .md)")

    p = sub.add_parser("check-config", help="validate a config and print it resolved")
    _config_args(p)
    return parser


def _import_tensorflow(args: argparse.Namespace) -> None:
    """Import TensorFlow, unless --verbose with stderr (fd 2) pointed at /dev/null meanwhile.

    Its C++ start-up lines (absl's InitializeLog notice, "Could not find cuda drivers") are
    printed during the import, before TF_CPP_MIN_LOG_LEVEL applies. An import that fails
    still raises, with its traceback, once stderr is back.
    """
    if args.verbose or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _train(args: argparse.Namespace) -> int:
    # JSON quoting keeps the path a string when read as YAML.
    tuned = [f"model.tuned_hparams={json.dumps(args.tuned)}"] if args.tuned else []
    cfg = load_config(args.config, _overrides(args) + tuned)
    _import_tensorflow(args)  # after the config: a bad one fails before TensorFlow loads
    from pipeline.gate import gate_line
    from pipeline.rounds import train_rounds

    provenance = None
    if cfg.model.tuned_hparams:  # resolved before training and handed over as data
        from pipeline.tune import apply_tuned

        cfg, provenance = apply_tuned(cfg)
    result = train_rounds(cfg, fresh=args.fresh, export=not args.no_export, provenance=provenance,
                          force=args.force)
    if not result.chief:
        print("\nthis worker's part is done; the chief writes the run and the export")
        return 0
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"test accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
          f"recall {m['recall']:.4f}  auc {_auc(m['auc'])}  loss {m['loss']:.4f}  "
          f"({m['examples']} reviews)")
    (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_pred"]
    negative, positive = m["confusion_matrix"]["labels"]
    print(f"confusion (true x pred): {negative} [{tn} {fp}]  {positive} [{fn} {tp}]")
    if "lstm" in m:  # the served model is a blend: each part alone, the BiLSTM first
        print("alone: " + "  ".join(f"{label} accuracy {m[part]['accuracy']:.4f} auc {_auc(m[part]['auc'])}"
                                    for part, label in (("lstm", "BiLSTM"), ("ngrams", "n-grams"))))
    if m["auc"] is None:
        print("auc: undefined, the test split holds one class (recorded as null)")
    if result.export:
        print(f"exported: {result.export.path} (version {result.export.version}; reloaded "
              f"predictions within {result.export.max_abs_diff:.2g})")
        if result.export.gate:
            print(gate_line(result.export.gate))
    return 0


def _auc(auc: float | None) -> str:
    return "undefined" if auc is None else f"{auc:.4f}"


def _export(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    if args.run and not (Path(args.run) / "config.yaml").is_file():
        raise PipelineError(f"--run {args.run}: not a run directory (no config.yaml); "
                            f"runs are under {cfg.runs_dir}/{cfg.name}/")
    _import_tensorflow(args)
    from pipeline.export import export_run  # not pipeline.train: re-exporting trains nothing
    from pipeline.gate import gate_line
    from pipeline.runs import latest_finished_run

    try:
        run_dir = Path(args.run) if args.run else latest_finished_run(cfg)
    except FileNotFoundError as exc:  # "no finished run": the user's to fix, not a bug
        raise PipelineError(str(exc)) from None
    result = export_run(run_dir, export_dir=cfg.export.dir, force=args.force, gate_on=cfg.export.gate)
    print(f"exported {run_dir} -> {result.path} (version {result.version}; reloaded "
          f"predictions within {result.max_abs_diff:.2g})")
    if result.gate:
        print(gate_line(result.gate))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    _import_tensorflow(args)
    from pipeline.pretrain import train_word2vec

    print(f"word2vec vectors: {train_word2vec(cfg)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    _import_tensorflow(args)
    from pipeline.bench import markdown_table, peer_table, run_bench, run_peer, write_peer, write_report

    if args.peer_only:  # seconds: the reference figures on whole splits (0 = all reviews)
        result = run_peer(cfg, args.train_examples or None, args.test_examples or None)
        write_peer(result, Path(args.peer_json))
        print(peer_table(result, ""))
        print(f"\nfigures in {args.peer_json}")
        return 0
    result = run_bench(cfg, args.train_examples, args.test_examples, args.epochs)
    write_report(result, Path(args.json), Path(args.markdown))
    print(markdown_table(result))
    print(f"\ntraining throughput (b)/(a) = {result['train_speedup']:.2f}; figures in {args.json}")
    return 0


def _bench_tables(args: argparse.Namespace) -> int:
    if args.size_mb <= 0 or args.short_rows < 1:
        raise ConfigError("--size-mb and --short-rows: must be positive")
    from pipeline import bench_tables

    results = bench_tables.run(args.size_mb, args.short_rows, Path(args.dir) if args.dir else None)
    bench_tables.write_results(results, Path(args.json))
    print(bench_tables.markdown_table(results))
    print(f"figures in {args.json}")
    return 0


def _results(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    from pipeline.results import write_results  # run records only: no TensorFlow

    runs = write_results(cfg, Path(args.runs_dir or cfg.runs_dir), Path(args.peer_json), Path(args.out))
    print(Path(args.out).read_text())
    print(f"{len(runs)} run(s) of {cfg.name}; written to {args.out}")
    return 0


def _train_workers(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {args.workers})")
    load_config(args.config, _overrides(args))  # a bad config fails once, here, not in every worker
    _import_tensorflow(args)
    from pipeline.distribute import run_local_workers

    argv = ["--verbose"] * bool(getattr(args, "verbose", False))
    argv += ["train", *(["--config", args.config] if args.config else [])]
    argv += [f"--set={shlex.quote(item)}" for item in _overrides(args)]  # split again in each worker
    argv += ["--fresh"] * args.fresh + ["--no-export"] * args.no_export
    return run_local_workers(args.workers, argv)


def _tune(args: argparse.Namespace) -> int:
    if args.worker and not args.tuner_id:
        raise ConfigError("--tuner-id: required with --worker (a unique name, e.g. tuner1)")
    if args.fresh and args.worker:
        raise ConfigError("--fresh: only the chief (or a single process) starts a search over")
    cfg = load_config(args.config, _overrides(args))
    _import_tensorflow(args)
    from pipeline import tune, tune_report

    if args.chief:
        tune.set_role("chief", *args.chief)
    elif args.worker:
        tune.set_role("worker", *args.worker, tuner_id=args.tuner_id)
    result = tune.run_search(cfg, fresh=args.fresh)
    print(tune_report.summary(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.model:
        model = Path(args.model)
    else:
        cfg = load_config(args.config, _overrides(args))
        model = Path(cfg.export.dir) / cfg.name
    if args.texts:
        texts = iter(args.texts)
    elif sys.stdin.isatty():
        print("error: give reviews as arguments, or pipe them one per line on stdin", file=sys.stderr)
        return 2
    else:  # bytes: a line that is not valid UTF-8 is still scored
        lines = (line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip())
        first = next(lines, None)  # before loading the model: no input is an error at once
        if first is None:
            raise PipelineError("no reviews on stdin (it was empty or held only blank lines): "
                                "pipe one review per line, or give them as arguments")
        texts = itertools.chain([first], lines)
    _import_tensorflow(args)
    from pipeline.predict import load, predict  # TensorFlow only: no training code

    path, serve = load(model)
    log.info("model: %s", path)
    try:
        for row in predict(serve, texts):
            print(json.dumps(row, ensure_ascii=False))
    except BrokenPipeError:  # the reader closed the pipe (e.g. `| head -1`): nothing to do
        _silence_stdout()
        return STDOUT_CLOSED
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    _import_tensorflow(args)
    from pipeline import evaluate, evaluate_report  # TensorFlow only: no training code

    model = Path(args.model) if args.model else Path(cfg.export.dir) / cfg.name
    result = evaluate.evaluate(model, args.data, cfg.data,
                               Path(args.against) if args.against else None, args.slice_by,
                               args.fit_threshold)
    folder = evaluate_report.write(result, Path(args.out))
    m = result["metrics"]
    low, high = m["accuracy"]["interval"]
    speed = result["speed"][0]["reviews_per_second"]
    print(f"{result['model']} on {result['data']}: {result['rows']} rows, {speed:.0f} reviews/s")
    print(f"accuracy {m['accuracy']['value']:.4f} (95% {low:.4f}-{high:.4f})  auc {m['auc']['value']:.4f}  "
          f"ece {m['ece']['value']:.4f}  log loss {m['log_loss']['value']:.4f}")
    worst = result["slices"][0]
    print(f"worst slice: {worst['slicing']} {worst['slice']}: accuracy {worst['accuracy']:.4f} "
          f"({worst['rows']} rows)")
    for t in result["thresholds"]:
        print(f"threshold for the best {t['metric']} here: {t['threshold']:.4f} ({t['value']:.4f}, "
              f"{t['at_0.5']:.4f} at 0.5; the export is unchanged)")
    if "against" in result:
        print(result["against"]["sentence"])
    print(f"report: {folder / 'report.md'}")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    for flag, value in (("--train-examples", args.train_examples), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1 (got {value})")
    cfg = load_config(args.config, _overrides(args))
    _import_tensorflow(args)
    from pipeline import gpu_check

    devices = gpu_check.visible_devices()
    if not any(d.startswith("GPU") for d in devices):
        print(gpu_check.no_gpu_line(devices))
        return 0
    result = gpu_check.run_gpu_check(cfg, args.train_examples, args.epochs)
    md_path = gpu_check.write_results(result, Path(args.json))
    print(gpu_check.markdown_table(result))
    print(f"figures in {args.json}, table in {md_path}")
    return 0 if gpu_check.passed(result) else 1


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


COMMANDS = {
    "train": _train,
    "train-workers": _train_workers,
    "export": _export,
    "tune": _tune,
    "pretrain": _pretrain,
    "predict": _predict,
    "evaluate": _evaluate,
    "bench": _bench,
    "bench-tables": _bench_tables,
    "results": _results,
    "check-config": _check_config,
    "gpu-check": _gpu_check,
}


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _flush_stdout() -> bool:
    """Flush now, where a closed pipe can be handled; False if the reader has gone."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        _silence_stdout()
        return False


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " / ".join(lines) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)  # the subcommand's flag, or the global one
    setup_logging(args.verbose)
    previous = handle_stop_signals()
    try:
        code = COMMANDS[args.command](args)
        return code if _flush_stdout() else STDOUT_CLOSED
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, or a KeyboardInterrupt raised in code
        return _interrupted(args.command)
    except Exception as exc:
        if stop_signal() is not None:  # the interruption, re-raised by TensorFlow as another error
            return _interrupted(args.command)
        if isinstance(exc, ConfigError):
            print(f"config error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, PipelineError):  # data, export, predict and tuning errors alike
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 1
        raise
    finally:
        restore_signals(previous)


if __name__ == "__main__":
    sys.exit(main())
