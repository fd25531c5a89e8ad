"""The release gate: a new model is published only if it is not worse beyond noise than the
newest published version, on the same test rows.

`pipeline.export` calls `gate` before it publishes a version (`export.gate`), and raises
`GateRefused` with `refusal`'s line when the gate says no; `force` publishes it anyway. The
published version is scored through its SavedModel (`pipeline.predict`), the new model by
the served probabilities the run computed; the comparison is an exact McNemar test on the
paired rows (`pipeline.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import predict, stats
from pipeline.constants import THRESHOLD
from pipeline.errors import ExportError


class GateRefused(ExportError):
    """The release gate kept the version out: worse beyond noise than the newest published one.

    `record` is what the run's export.json holds instead of a published version.
    """

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class GateRows:
    """The run's test split and the new model's served probabilities of it: what the gate compares on."""

    texts: list[str]
    labels: np.ndarray  # 0/1
    probabilities: np.ndarray  # P(label 1), as the new model serves them
    names: tuple[str, str]  # the names of label 0 and label 1


GATE_P = stats.BEYOND_NOISE  # worse beyond noise: lower test accuracy, exact McNemar p below this


def gate(model_dir: Path, test: GateRows, force: bool = False) -> dict:
    """Compare the new model with the newest version under `model_dir` on the same test rows.

    Both are scored as they serve: the published version through its SavedModel (its `label`
    output against the true names), the new one by its served probabilities. The record for
    export.json says `first` (nothing published yet), `published`, `refused` (lower accuracy
    with an exact McNemar p below GATE_P) or `forced` (refused but for `force`).
    """
    try:
        previous = predict.resolve_version(model_dir)
    except predict.ModelError:
        return {"decision": "first", "rows": len(test.texts)}
    try:
        _, serve = predict.load(previous)
    except predict.ModelError:
        raise ExportError(f"not published: the release gate cannot load version {previous.name} "
                          f"({previous}) to compare with: repair or remove it, or export without "
                          "the gate (--set export.gate=false)") from None
    _, served_names = predict.score(serve, test.texts)
    truth = np.asarray(test.names)[test.labels]
    old_right = np.asarray(served_names) == truth
    new_right = (test.probabilities >= THRESHOLD) == (test.labels == 1)
    cmp = stats.paired_difference(old_right, new_right)
    worse = cmp["difference"] < 0 and cmp["p"] < GATE_P
    return {"compared_with": str(previous), "version": int(previous.name), "rows": cmp["rows"],
            "accuracy": cmp["b"], "previous_accuracy": cmp["a"], "difference": cmp["difference"],
            "interval": [cmp["low"], cmp["high"]], "p": cmp["p"],
            "rule": f"refused when its accuracy is lower with exact McNemar p < {GATE_P}",
            "decision": ("forced" if force else "refused") if worse else "published"}


def gate_line(record: dict | None) -> str:
    """What the gate decided, for the command's summary ("" when it was off)."""
    if record is None:
        return ""
    if record["decision"] == "first":
        return "release gate: the first version of this name, nothing to compare with"
    return (f"release gate: {record['decision']}, test accuracy {record['accuracy']:.4f} against version "
            f"{record['version']}'s {record['previous_accuracy']:.4f} ({stats.p_text(record['p'])})")


def refusal(record: dict, new_version: int) -> str:
    """The one line a refused export ends with: by how much, and how to publish anyway."""
    half = (record["interval"][1] - record["interval"][0]) / 2 * 100
    return (f"not published: version {new_version} would score {record['accuracy']:.4f} (test accuracy) "
            f"against version {record['version']}'s {record['previous_accuracy']:.4f}, worse by "
            f"{-record['difference'] * 100:.2f} ± {half:.2f} points ({stats.p_text(record['p'])}); "
            "`make export ARGS=--force` publishes this run anyway, without training again")
