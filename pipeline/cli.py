"""Command line: the only module that defines flags. `imdb-pipeline <command> --help`.

The flags are here; what each command does is in `pipeline.commands`, which imports every
stage inside its function, so `--help` and a config error come before TensorFlow loads.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pipeline.commands import COMMANDS
from pipeline.errors import ConfigError, PipelineError, stop_signal
from pipeline.process import STDOUT_CLOSED, flush_stdout, handle_stop_signals, restore_signals, setup_logging

INTERRUPT_HINT = ("interrupted: rerun the same command to resume: training from the last completed "
                  "epoch, or at evaluation and export if training had finished (add --fresh to start "
                  "over)")
TUNE_INTERRUPT_HINT = ("interrupted: rerun the same command to resume; finished executions are kept and "
                       "the interrupted one resumes from its last finished epoch (--fresh starts over)")


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
                   help="discard the earlier executions of this config name and search again")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--chief", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: serve the search on HOST:PORT (e.g. 0.0.0.0:8000) and hand "
                          "executions to workers; the chief trains nothing and writes the report")
    who.add_argument("--worker", metavar="HOST:PORT", type=_address, default=None,
                     help="distributed: run the executions handed out by the chief at HOST:PORT")
    p.add_argument("--tuner-id", metavar="NAME", default=None,
                   help="this worker's name (required with --worker): unique among the workers and "
                        "the same on a restart, which then resumes its unfinished execution (e.g. tuner1)")

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
        return code if flush_stdout() else STDOUT_CLOSED
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
