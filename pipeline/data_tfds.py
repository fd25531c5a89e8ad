"""The `tfds` data source: a tensorflow-datasets dataset (`data.tfds_name`, imdb_reviews by
default), read from a prepared copy or downloaded once (`data.download`).

One of the three source adapters behind `pipeline.data` (`splits`, `unsupervised_texts`,
`identity`), plus `named_split`: one split by its name, for scoring a model on it.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import tensorflow as tf

from pipeline.config import DataConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0  # seconds to wait for the download host before calling tfds (which retries for minutes)


def _percent(fraction: float) -> int:
    pct = round((1.0 - fraction) * 100)
    return min(max(pct, 1), 99)


def tfds_data_dir(cfg: DataConfig) -> str | None:
    """Where tfds keeps prepared datasets: data.data_dir, then $TFDS_DATA_DIR, then tfds's default."""
    return cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _hint(cfg: DataConfig, why: str) -> DataError:
    return DataError(f"cannot load tfds dataset {cfg.tfds_name!r} ({why}): set TFDS_DATA_DIR (or "
                     "data.data_dir) to a prepared copy, the data dir of a machine with internet "
                     f"after `tfds build {cfg.tfds_name}`; or use data.source=directory or files")


def _failure(cfg: DataConfig, builder, exc: Exception) -> DataError:
    """One line for a failed tfds load: tfds's own words for a missing copy are advice for
    Python callers, and its other messages run to several lines."""
    if not builder.is_prepared():
        return _hint(cfg, f"no prepared copy in {builder.data_dir}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _hint(cfg, first[:200])


def _builder(cfg: DataConfig):
    """tfds's builder of data.tfds_name; an unknown name is one line with the nearest names."""
    import difflib

    import tensorflow_datasets as tfds

    try:
        return tfds.builder(cfg.tfds_name, data_dir=tfds_data_dir(cfg))
    except tfds.core.registered.DatasetNotFoundError:
        base = cfg.tfds_name.split("/")[0].split(":")[0]
        near = difflib.get_close_matches(base, set(tfds.list_builders(with_community_datasets=False)), n=1)
        raise DataError(f"data.tfds_name: tensorflow-datasets has no dataset {base!r}"
                        + (f"; did you mean {near[0]!r}?" if near else
                           " (`tfds.list_builders()` lists them)")) from None


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if the server of `url` answers within `timeout` seconds, else why not.

    A HEAD request through urllib (so proxy settings apply), in a thread so that a slow
    name lookup, which a socket timeout does not cover, is bounded too.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:  # an HTTP status is an answer
            outcome.append(None)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            outcome.append(str(getattr(exc, "reason", exc)))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _download(cfg: DataConfig, builder) -> bool:
    """Whether tfds.load may download: data.download, and for `auto` a quick look at the network."""
    if cfg.download != "auto":
        return cfg.download == "always"
    if builder.is_prepared():
        return False
    url = next(iter(builder.url_infos or {}), None)  # from the dataset's checksums file
    why = unreachable(url) if url else None
    if why:
        raise _hint(cfg, f"no prepared copy in {builder.data_dir} and its download "
                         f"server cannot be reached: {why}")
    log.info("no prepared copy of %s in %s: downloading and preparing it (once)",
             cfg.tfds_name, builder.data_dir)
    return True


def _keys(cfg: DataConfig, info) -> tuple[str, str, bool]:
    """(text feature, label feature, whether they are the supervised keys) of a tfds dataset."""
    supervised = tuple(info.supervised_keys or ())[:2]
    text_key = cfg.text_key or (supervised[0] if supervised else "text")
    label_key = cfg.label_key or (supervised[1] if supervised else "label")
    features = list(info.features.keys())
    for what, key in (("text_key", text_key), ("label_key", label_key)):
        if key not in features:
            raise DataError(f"tfds dataset {cfg.tfds_name!r} has no feature {key!r} (features: "
                            f"{', '.join(features)}); set data.{what}")
    return text_key, label_key, (text_key, label_key) == supervised


def _labels(cfg: DataConfig, info, label_key: str) -> tuple[tuple[str, str], bool]:
    """The label names (the ClassLabel's, else data.labels or 0/1), and whether to flip the labels
    because data.labels names the ClassLabel's classes the other way round."""
    import tensorflow_datasets as tfds

    feature = info.features[label_key]
    given = cfg.label_names()
    if not isinstance(feature, tfds.features.ClassLabel):
        return given or ("0", "1"), False
    names = tuple(feature.names)
    if len(names) != 2:
        more = "; multi-class is not supported yet" if len(names) > 2 else ""
        raise DataError(f"tfds dataset {cfg.tfds_name!r}: {label_key!r} has {len(names)} "
                        f"class(es) ({', '.join(names)}): exactly two are needed{more}")
    if given is not None and set(given) != set(names):
        raise DataError(f"data.labels {list(given)} are not the classes of {cfg.tfds_name!r}'s "
                        f"{label_key!r} ({', '.join(names)})")
    return (given or names), given is not None and given != names


def splits(cfg: DataConfig, seed: int
           ) -> tuple[tuple[tf.data.Dataset, ...], tuple[str, ...], tuple[str, str]]:
    """The three splits, the record files they read, and the label names."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    cut = _percent(cfg.validation_fraction)
    train, test = cfg.train_split, cfg.test_split
    names = [f"{train}[:{cut}%]", f"{train}[{cut}%:]", test]
    builder = _builder(cfg)
    try:
        text_key, label_key, supervised = _keys(cfg, builder.info)
        labels, flip = _labels(cfg, builder.info, label_key)
        download = _download(cfg, builder)
        datasets = tuple(tfds.load(cfg.tfds_name, split=names, data_dir=data_dir, download=download,
                                   as_supervised=supervised, shuffle_files=False,
                                   read_config=tfds.ReadConfig(shuffle_seed=seed)))
    except DataError:
        raise
    except Exception as exc:  # tfds raises many types; the user needs one message
        raise _failure(cfg, builder, exc) from exc
    if not supervised:
        datasets = tuple(ds.map(lambda ex: (ex[text_key], tf.cast(ex[label_key], tf.int64)))
                         for ds in datasets)
    if flip:
        datasets = tuple(ds.map(lambda t, y: (t, 1 - tf.cast(y, tf.int64))) for ds in datasets)
    files = tuple(sorted(str(f) for f in Path(builder.data_dir).glob("*.tfrecord*")))
    return datasets, files, labels


def unsupervised_texts(cfg: DataConfig) -> tf.data.Dataset | None:
    """The dataset's `unsupervised` split, or None if it has no such split."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    builder = _builder(cfg)
    try:
        if "unsupervised" not in builder.info.splits:
            return None
        text_key, _, supervised = _keys(cfg, builder.info)
        ds = tfds.load(cfg.tfds_name, split="unsupervised", data_dir=data_dir,
                       download=_download(cfg, builder), as_supervised=supervised)
    except DataError:
        raise
    except Exception as exc:
        if not builder.is_prepared():
            raise _hint(cfg, f"no prepared copy in {builder.data_dir}") from exc
        raise DataError(f"cannot load the unsupervised split of {cfg.tfds_name!r}: {exc}") from exc
    return ds.map(lambda text, _: text) if supervised else ds.map(lambda ex: ex[text_key])


def identity(cfg: DataConfig) -> dict:
    """The dataset's name, version and split sizes from the prepared copy's info (nothing is
    downloaded)."""
    import tensorflow_datasets as tfds

    try:
        info = tfds.builder(cfg.tfds_name, data_dir=tfds_data_dir(cfg)).info
    except Exception as exc:  # tfds raises many types; the user needs one message
        raise DataError(f"cannot read the info of tfds dataset {cfg.tfds_name!r}: {exc}") from exc
    return {"source": "tfds", "name": info.full_name, "version": str(info.version),
            "splits": {name: split.num_examples for name, split in sorted(info.splits.items())}}


def named_split(cfg: DataConfig, split: str
                ) -> tuple[tf.data.Dataset, tuple[str, ...] | None, int | None, str]:
    """One split of tfds dataset `data.tfds_name` as (text, label) pairs, in the dataset's order,
    for scoring a model on it; the label's class names (None when it is not a ClassLabel), the
    split's size where the prepared copy records it, and the label feature's name. `split` may
    be sliced (`test[:10%]`)."""
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir(cfg)
    builder = _builder(cfg)
    try:
        text_key, label_key, supervised = _keys(cfg, builder.info)
        download = _download(cfg, builder)
        known = list(builder.info.splits)
        if known and split.split("[")[0] not in known:
            raise DataError(f"tfds dataset {cfg.tfds_name!r} has no split {split!r} (splits: "
                            f"{', '.join(known)})")
        ds = tfds.load(cfg.tfds_name, split=split, data_dir=data_dir, download=download,
                       as_supervised=supervised, shuffle_files=False)
        size = builder.info.splits[split].num_examples if known else None
    except DataError:
        raise
    except Exception as exc:  # tfds raises many types; the user needs one message
        raise _failure(cfg, builder, exc) from exc
    if not supervised:
        ds = ds.map(lambda ex: (ex[text_key], ex[label_key]))
    feature = builder.info.features[label_key]
    names = tuple(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
    return ds, names, size, label_key
