"""Command line: the only module that defines flags. `imdb-pipeline <command> --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.config import ConfigError, load_config

log = logging.getLogger("pipeline")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.epochs=3 (repeatable; "
                        "space-separated pairs in one argument also work)")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [item for arg in args.overrides for item in arg.split()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imdb-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="ingest, vectorize, train, evaluate and export")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run instead of resuming an interrupted one")
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")

    p = sub.add_parser("export", help="export the latest finished run again, without retraining")
    _config_args(p)
    p.add_argument("--run", default=None, help="run directory (default: the latest finished run)")

    p = sub.add_parser("check-config", help="validate a config and print it resolved")
    _config_args(p)
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    cfg = load_config(args.config, _overrides(args))
    result = train(cfg, fresh=args.fresh, export=not args.no_export)
    m = result.metrics
    print(f"\nrun: {result.run_dir}")
    print(f"test accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
          f"recall {m['recall']:.4f}  auc {m['auc']:.4f}  loss {m['loss']:.4f}  "
          f"({m['examples']} reviews)")
    (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_pred"]
    print(f"confusion (true x pred): neg [{tn} {fp}]  pos [{fn} {tp}]")
    if result.export:
        print(f"exported: {result.export.path} (version {result.export.version}; reloaded "
              f"predictions within {result.export.max_abs_diff:.2g})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.train import export_run, latest_finished_run

    cfg = load_config(args.config, _overrides(args))
    run_dir = Path(args.run) if args.run else latest_finished_run(cfg)
    result = export_run(run_dir, export_dir=cfg.export.dir)
    print(f"exported {run_dir} -> {result.path} (version {result.version}; reloaded "
          f"predictions within {result.max_abs_diff:.2g})")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args))
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


COMMANDS = {"train": _train, "export": _export, "check-config": _check_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ log is mostly noise here (no CUDA, op attributes); errors still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # tfds logs every file it opens
    warnings.filterwarnings("ignore", message=".*(ran out of data|shuffle=True. was passed).*")
    from pipeline.data import DataError

    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last completed epoch "
              "(add --fresh to start over)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
