"""What a search trains, in what order, and what it concludes: the plan and the pick.

Plain functions of the config and of the executions' records, no TensorFlow: the oracle
(`pipeline.tune`) asks `planned` what to hand out next, and the report
(`pipeline.tune_report`) asks `summarize`, `compare` and `pick` what the executions say.

An execution is one training of one embedding size with one seed (`seed + index`). A search
first screens every size (`tune.screen_epochs` epochs, one seed, the BiLSTM alone), keeps the
`tune.keep` best (the configured size among them when the screen cannot tell it from the best),
and trains each of those `tune.executions` times in full: successive halving
over sizes, so the full trainings go to the sizes that can still win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config, TuneConfig
from pipeline.errors import ConfigError
from pipeline.stats import paired_difference

SCREEN, FULL = "screen", "full"
RANKED_BY = "val_accuracy"  # the BiLSTM alone's: what the sizes are compared on (docs/tuning.md)


@dataclass(frozen=True)
class Execution:
    dim: int
    index: int  # the seed is the config's seed + index
    stage: str  # SCREEN or FULL

    @property
    def key(self) -> str:
        return f"{self.dim}d-{self.stage}-{self.index}"

    @property
    def values(self) -> dict:
        """As the oracle's trial values: searched names only."""
        return {"embedding_dim": self.dim, "execution": self.index, "full": self.stage == FULL}

    @classmethod
    def of(cls, values: dict) -> Execution:
        return cls(int(values["embedding_dim"]), int(values["execution"]),
                   FULL if values["full"] else SCREEN)


def screens(tune: TuneConfig) -> bool:
    """Whether the search screens: only when it would drop a size."""
    return tune.screen_epochs is not None and tune.keep < len(tune.embedding_dims)


def screen_ranking(screen_scores: dict[int, float | None]) -> list[int]:
    """The screened sizes, best first (None: the screen failed, never ranked); a tie goes to the
    smaller size."""
    scored = [d for d, s in screen_scores.items() if s is not None]
    return sorted(scored, key=lambda d: (-screen_scores[d], d))


def kept_sizes(tune: TuneConfig, screen_scores: dict[int, float | None], prefer: int | None = None,
               screen_correct: dict[int, np.ndarray] | None = None) -> list[int]:
    """The `tune.keep` sizes with the best screening score (None: the screen failed, never kept);
    a tie goes to the smaller size.

    `prefer` (the configured size, which `make train` trains and the search can adopt) is kept
    right after the best when the screen cannot tell the two apart: the paired interval of their
    per-review right/wrong (`screen_correct`) holds no difference. Among sizes the screen cannot
    separate, which one ranks second is chance (docs/experiments/tuning.md); keeping the default
    puts the comparison users ask for, pick against default, into the full stage, and saves a
    full training when `make train` has run.
    """
    ranked = screen_ranking(screen_scores)
    if prefer in ranked[1:] and screen_correct and {ranked[0], prefer} <= screen_correct.keys():
        versus = compare({d: [screen_correct[d]] for d in (ranked[0], prefer)}, ranked[0])[prefer]
        if versus["high"] >= 0:
            ranked.remove(prefer)
            ranked.insert(1, prefer)
    return sorted(ranked[:tune.keep])


def planned(tune: TuneConfig, screen_scores: dict[int, float | None], prefer: int | None = None,
            screen_correct: dict[int, np.ndarray] | None = None) -> list[Execution]:
    """Every execution the search trains, given the screening scores known so far (and, for
    `kept_sizes`, the preferred size and the screens' per-review right/wrong).

    The full stage is planned only once every size is screened, since the screen decides it.
    """
    if not screens(tune):
        dims = list(tune.embedding_dims)
    else:
        plan = [Execution(d, 0, SCREEN) for d in tune.embedding_dims]
        if len(screen_scores) < len(tune.embedding_dims):
            return plan
        dims = kept_sizes(tune, screen_scores, prefer, screen_correct)
        return plan + [Execution(d, k, FULL) for k in range(tune.executions) for d in dims]
    return [Execution(d, k, FULL) for k in range(tune.executions) for d in dims]


def check_tunable(cfg: Config) -> None:
    """A config whose embedding size can be searched: its start must come in every size."""
    init = cfg.model.embedding_init
    if init not in ("random", "word2vec"):
        raise ConfigError(f"model.embedding_init: {init!r} fixes the embedding size (a vectors file "
                          "or language models of one size); tune with word2vec or random")
    size, largest = cfg.pretrain.vector_size, max(cfg.tune.embedding_dims)
    if init == "word2vec" and size and size < largest:
        raise ConfigError(f"pretrain.vector_size: {size}-d word2vec vectors cannot start the "
                          f"{largest}-d candidate (leave it unset, or set it to at least {largest})")


# --- what the executions say -------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSummary:
    dim: int
    n: int  # full executions
    mean: float  # of RANKED_BY over the executions
    se: float  # standard error of the mean: sample standard deviation / sqrt(n)
    served_mean: float | None


def summarize(rows: list[dict]) -> list[SizeSummary]:
    """Per size with at least two full executions: mean and standard error, smallest size first."""
    by_dim: dict[int, list[dict]] = {}
    for r in rows:
        if r["stage"] == FULL:
            by_dim.setdefault(int(r["embedding_dim"]), []).append(r)
    out = []
    for dim in sorted(by_dim):
        scores = np.array([r[RANKED_BY] for r in by_dim[dim]], dtype=np.float64)
        if scores.size < 2:
            continue
        served = [r.get("val_served_accuracy") for r in by_dim[dim]]
        served_mean = float(np.mean(served)) if all(v is not None for v in served) else None
        out.append(SizeSummary(dim, int(scores.size), float(scores.mean()),
                               float(scores.std(ddof=1) / math.sqrt(scores.size)), served_mean))
    return out


def best_of(summaries: list[SizeSummary]) -> SizeSummary:
    """The highest mean; a tie goes to the smaller size."""
    return max(summaries, key=lambda s: (s.mean, -s.dim))


def pick(summaries: list[SizeSummary], rule: str) -> SizeSummary:
    """`best`: the highest mean. `one_se`: the smallest size whose mean is at least the best
    mean minus the best's standard error (Breiman et al., 1984), as sizes within noise of the
    best cost less to train and serve."""
    best = best_of(summaries)
    if rule == "best":
        return best
    return min((s for s in summaries if s.mean >= best.mean - best.se), key=lambda s: s.dim)


def compare(correct: dict[int, list[np.ndarray]], best: int) -> dict[int, dict]:
    """Each size against `best` on the same validation reviews: the per-review right/wrong of
    execution k of one size is paired with execution k of the best (the same seed, so the same
    validation reviews for every data source), the pairs of all k pooled. A paired bootstrap
    interval of the accuracy difference (size minus best) and McNemar's p (`stats.paired_difference`)."""
    out = {}
    for dim, runs in correct.items():
        if dim == best:
            continue
        pairs = min(len(runs), len(correct[best]))
        a = np.concatenate(correct[best][:pairs])
        b = np.concatenate(runs[:pairs])
        out[dim] = paired_difference(a, b)
    return out


def points(x: float) -> str:
    return f"{100 * x:.1f}"


def sentence(summaries: list[SizeSummary], chosen: SizeSummary, rule: str,
             comparisons: dict[int, dict], dropped: dict[int, float | None] | None = None,
             kept_floor: float | None = None, gave_way: tuple[list[int], int, int] | None = None) -> str:
    """The report's first line: which sizes are within noise of the best, which are worse and
    by how much, which the screen dropped (`dropped`: their screening scores, against the
    lowest one kept on its score, `kept_floor`; `gave_way`: sizes dropped for the configured
    size and the screen's best, see `kept_sizes`), and what was picked by which rule."""
    best = best_of(summaries)
    within = [s.dim for s in summaries if s.mean >= best.mean - best.se]
    accuracy = f"{points(best.mean)} ± {points(best.se)}% BiLSTM validation accuracy"
    if within == [best.dim]:
        parts = [f"{best.dim}-d is the best ({accuracy})"]
    else:
        parts = [f"{_dims(within)} are within one standard error of the best ({best.dim}-d, {accuracy})"]
    for s in summaries:
        if s.dim in within:
            continue
        gap = f"by {points(best.mean - s.mean)} ± {points(math.hypot(best.se, s.se))} points"
        c = comparisons.get(s.dim)
        if c is None:
            parts.append(f"{s.dim}-d is lower {gap}")
        elif c["high"] < 0:  # the paired interval excludes no difference
            parts.append(f"{s.dim}-d is worse {gap} (paired 95% interval {points(c['low'])} to "
                         f"{points(c['high'])})")
        else:
            parts.append(f"{s.dim}-d is lower {gap}, within noise review by review (paired 95% "
                         f"interval {points(c['low'])} to {points(c['high'])})")
    if gave_way:
        given, preferred, screen_best = gave_way
        parts.append(f"in the screen, {_dims(given)} and the configured {preferred}-d were both within "
                     f"noise of its best, {screen_best}-d, and {_dims(given)} gave way to {preferred}-d")
    parts += _screen_parts(dropped or {}, kept_floor)
    how = ("as the smallest size within one standard error of the best" if rule == "one_se"
           else "as the highest mean")
    return "; ".join(parts) + f". Picked {chosen.dim}-d {how}."


def _screen_parts(dropped: dict[int, float | None], kept_floor: float | None) -> list[str]:
    """A size dropped on a tie with a kept one did not fall behind: `kept_sizes` breaks ties
    toward the smaller size, and the sentence must not call that a loss."""
    scored = {d: s for d, s in sorted(dropped.items()) if s is not None}
    behind = [d for d, s in scored.items() if kept_floor is None or s < kept_floor]
    tied = [d for d in scored if d not in behind]
    failed = [d for d, s in sorted(dropped.items()) if s is None]
    parts = []
    if behind:
        parts.append(f"{_dims(behind)} fell behind in the screen")
    if tied:
        verb = "ties" if len(tied) == 1 else "tie"
        parts.append(f"{_dims(tied)} {verb} the last kept size in the screen and "
                     f"{'was' if len(tied) == 1 else 'were'} dropped as the larger")
    if failed:
        parts.append(f"{_dims(failed)} failed in the screen")
    return parts


def _dims(dims: list[int]) -> str:
    names = [f"{d}-d" for d in dims]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
