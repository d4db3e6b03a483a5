"""Confidence intervals for quality claims over training seeds, and plots with CI bands.

Input: per-example scores on one fixed evaluation set, one row per training seed, float array
[S, N] (a deterministic row such as the no-training baseline may be [N]); optionally the task of
each example, [N]. Methods compared with each other must have been run with the same S seeds in
the same order: seed s of one method is paired with seed s of the other (same data order and
client sampling), and example i with example i.

The resampling units: seeds and tasks, crossed. A comparison should hold for other training
seeds and for other tasks of the same kind, so both are sampled. Examples of one task share an
instruction and an answer format and fail or succeed together, so they are not independent: the
task, not the example, is the unit (``tasks=None`` falls back to examples). Each bootstrap
replicate draws S seeds and T tasks with replacement, independently, and recomputes the statistic
from the (seed, task) cells; seeds are drawn once per replicate for all methods (paired), tasks
likewise.

With few seeds (5 is typical), a percentile interval from resampling 5 values is too narrow: the
bootstrap's variance is (S-1)/S of the unbiased one and its tails are normal where they should
be Student-t with S-1 degrees of freedom. In a simulation of 5 seeds x 13 tasks x 16 examples with
the seed effect dominant, the plain crossed percentile interval covered the truth 81% of the time.
So each end of the interval is the farther of the crossed percentile end and estimate -+ t(df) * SE,
where SE^2 = S/(S-1) Var_seeds + T/(T-1) Var_tasks comes from the seed-only and task-only
bootstrap variances (bias-corrected) and df is Welch-Satterthwaite's. In simulations (5 seeds x 13
tasks x 16 examples, 1000-2000 trials per regime) this covered 93-99.7% in every regime (seed-,
task- or noise-dominated; about 95% where seeds dominate); it is conservative when the seed x
task interaction or per-example noise dominates, as the crossed bootstrap is (Owen 2007). Every
interval is a deterministic function of the data and ``seed``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_REPLICATES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval [low, high].

    n_seeds, n_units: how many seeds and resampling units (tasks or examples) it rests on.
    unbounded: the interval is (-inf, inf) because the statistic is a ratio whose denominator
        is not distinguishable from zero (Fieller's case).
    """

    value: float
    low: float
    high: float
    confidence: float
    n_seeds: int
    n_units: int
    unit: str
    unbounded: bool = False

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


# ---- Student t quantiles (no SciPy dependency) --------------------------------------------------


def _betainc_fraction(a: float, b: float, x: float) -> float:
    # Continued fraction of the regularised incomplete beta function (modified Lentz).
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (df may be fractional)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`);
    ``df = inf`` gives the normal quantile."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0; got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if math.isinf(df):
        return float(np.sqrt(2.0) * _erfinv(2.0 * p - 1.0))
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _erfinv(y: float) -> float:
    low, high = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if math.erf(mid) < y:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ---- the crossed bootstrap ---------------------------------------------------------------------


def _as_matrix(scores, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"{name} must be [seeds, examples] or [examples] scores; got shape {np.shape(scores)}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds non-finite scores")
    return values


def _units(tasks, n: int) -> tuple[np.ndarray, int, str]:
    """Unit index of every example [n], number of units, unit name."""
    if tasks is None:
        return np.arange(n), n, "example"
    labels = np.asarray(tasks)
    if labels.shape != (n,):
        raise ValueError(f"tasks must give one task per example ({n}); got shape {labels.shape}")
    _, index = np.unique(labels, return_inverse=True)
    return index, int(index.max()) + 1, "task"


def _cells(values: np.ndarray, unit_index: np.ndarray, n_units: int) -> np.ndarray:
    """Per (seed, unit) sums of scores, [S, U]."""
    sums = np.zeros((values.shape[0], n_units))
    for s in range(values.shape[0]):
        sums[s] = np.bincount(unit_index, weights=values[s], minlength=n_units)
    return sums


def _replicate_means(cells: np.ndarray, counts: np.ndarray, seed_weights: np.ndarray, unit_weights: np.ndarray) -> np.ndarray:
    """Mean score of every replicate [B] from cell sums [S, U], examples per unit [U] and
    multiplicity weights [B, S] and [B, U]; a row with S = 1 (a deterministic baseline) is shared
    by every seed."""
    if cells.shape[0] == 1:
        return (unit_weights @ cells[0]) / (unit_weights @ counts)
    total = np.einsum("bs,su,bu->b", seed_weights, cells, unit_weights)
    return total / (seed_weights.sum(1) * (unit_weights @ counts))


def _weights(rng: np.random.Generator, size: int, replicates: int, resample: bool) -> np.ndarray:
    if not resample or size == 1:
        return np.ones((replicates, size))
    return rng.multinomial(size, np.full(size, 1.0 / size), size=replicates).astype(np.float64)


def _bootstrap(statistic, rows: Sequence[np.ndarray], tasks, confidence: float, replicates: int, seed: int,
               ratio: bool = False) -> Estimate:
    """Crossed percentile interval of ``statistic(means of rows)``, widened to the small-sample t
    interval where that is wider (see the module docstring)."""
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1); got {confidence}")
    if replicates < 100:
        raise ValueError(f"replicates must be >= 100; got {replicates}")
    n = rows[0].shape[1]
    if any(row.shape[1] != n for row in rows):
        raise ValueError("every score array must cover the same evaluation set (same number of examples)")
    seed_counts = {row.shape[0] for row in rows if row.shape[0] > 1}
    if len(seed_counts) > 1:
        raise ValueError(f"paired comparisons need the same seeds for every method; got seed counts {sorted(seed_counts)}")
    n_seeds = seed_counts.pop() if seed_counts else 1
    unit_index, n_units, unit = _units(tasks, n)
    counts = np.bincount(unit_index, minlength=n_units).astype(np.float64)
    cells = [_cells(row, unit_index, n_units) for row in rows]
    point = statistic(*[row.mean() for row in rows])

    rng = np.random.default_rng(seed)
    draws = {}
    for name, by_seed, by_unit in (("crossed", True, True), ("seeds", True, False), ("units", False, True)):
        seed_weights = _weights(rng, n_seeds, replicates, by_seed)
        unit_weights = _weights(rng, n_units, replicates, by_unit)
        with np.errstate(divide="ignore", invalid="ignore"):
            draws[name] = statistic(*[_replicate_means(c, counts, seed_weights, unit_weights) for c in cells])
    alpha = 1.0 - confidence
    crossed = draws["crossed"]
    if ratio and (not math.isfinite(point) or np.mean(~np.isfinite(crossed)) > alpha / 2):
        return Estimate(float(point), -math.inf, math.inf, confidence, n_seeds, n_units, unit, unbounded=True)
    low, high = np.quantile(crossed, [alpha / 2, 1 - alpha / 2])
    finite_var = lambda x: float(np.var(x[np.isfinite(x)]))
    var_seeds = finite_var(draws["seeds"]) * n_seeds / (n_seeds - 1) if n_seeds > 1 else 0.0
    var_units = finite_var(draws["units"]) * n_units / (n_units - 1) if n_units > 1 else 0.0
    if var_seeds + var_units > 0:
        components = [(v, k - 1) for v, k in ((var_seeds, n_seeds), (var_units, n_units)) if v > 0]
        df = (var_seeds + var_units) ** 2 / sum(v * v / dof for v, dof in components)
        half = t_quantile(1 - alpha / 2, df) * math.sqrt(var_seeds + var_units)
        low, high = min(low, point - half), max(high, point + half)
    return Estimate(float(point), float(low), float(high), confidence, n_seeds, n_units, unit)


def mean_ci(scores, tasks=None, *, confidence: float = CONFIDENCE, replicates: int = DEFAULT_REPLICATES,
            seed: int = 0) -> Estimate:
    """Mean score over seeds and examples with its confidence interval.

    scores: [S, N] (S training seeds) or [N]. tasks: the task of each example, [N] (the
    resampling unit), or None to resample examples. seed: the bootstrap's seed.
    """
    return _bootstrap(lambda m: m, [_as_matrix(scores, "scores")], tasks, confidence, replicates, seed)


def paired_difference(scores_a, scores_b, tasks=None, *, confidence: float = CONFIDENCE,
                      replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Estimate:
    """Mean of A - B with its paired confidence interval (seed s with seed s, example i with i).

    scores_a, scores_b: [S, N] each with the same seeds, or one of them [N] (a deterministic row,
    e.g. the no-training baseline, compared with every seed of the other).
    """
    rows = [_as_matrix(scores_a, "scores_a"), _as_matrix(scores_b, "scores_b")]
    return _bootstrap(lambda a, b: a - b, rows, tasks, confidence, replicates, seed)


def gain_ratio(scores_method, scores_reference, scores_baseline, tasks=None, *, confidence: float = CONFIDENCE,
               replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Estimate:
    """(method - baseline) / (reference - baseline): e.g. Ferret's gain over the no-training model
    as a fraction of FedAvg's, with its bootstrap interval.

    scores_method, scores_reference: [S, N] with the same seeds. scores_baseline: [N] or [S, N].
    The interval is (-inf, inf) (``unbounded``) when the reference gain is not positive or more
    than (1 - confidence)/2 of the replicates have no positive reference gain: then the ratio is
    not estimable from these runs; fewer such replicates can still leave one end infinite.
    """
    rows = [_as_matrix(scores_method, "scores_method"), _as_matrix(scores_reference, "scores_reference"),
            _as_matrix(scores_baseline, "scores_baseline")]

    def ratio(method, reference, baseline):
        # A replicate without a positive reference gain has no finite ratio: it counts as +-inf
        # (the limit as that gain falls to 0+), so it widens the interval instead of vanishing.
        gain, numerator = reference - baseline, method - baseline
        limit = np.where(numerator >= 0, np.inf, -np.inf)
        return np.where(gain > 0, numerator / np.where(gain > 0, gain, 1.0), limit)

    return _bootstrap(ratio, rows, tasks, confidence, replicates, seed, ratio=True)


def seed_ratio(gains_method, gains_reference, *, confidence: float = CONFIDENCE) -> Estimate:
    """mean(gains_method) / mean(gains_reference) over paired seeds, with Fieller's interval.

    gains_method, gains_reference: [S] per-seed gains on one fixed evaluation set (e.g. the drop in
    held-out loss from the no-training model), seed s paired with seed s. The interval is the set
    of ratios r for which the paired t-test of mean(gains_method - r * gains_reference) = 0, with
    S - 1 degrees of freedom, does not reject; it generalises over training seeds only, not over
    tasks (the evaluation set is fixed). It is unbounded when the reference's mean gain is not
    distinguishable from zero by the same test (Fieller's case).
    """
    m, r = (np.asarray(x, dtype=np.float64) for x in (gains_method, gains_reference))
    if m.ndim != 1 or m.shape != r.shape or m.size < 2:
        raise ValueError(f"gains_method and gains_reference must be 1-D with the same length >= 2 (paired seeds); "
                         f"got shapes {m.shape} and {r.shape}")
    if not (np.isfinite(m).all() and np.isfinite(r).all()):
        raise ValueError("gains must be finite")
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1); got {confidence}")
    n = m.size
    t2 = t_quantile(1 - (1 - confidence) / 2, n - 1) ** 2 / n
    cov = np.cov(np.stack([m, r]), ddof=1)
    point = m.mean() / r.mean() if r.mean() != 0 else math.nan
    # (mean_m - x mean_r)^2 <= t^2 Var(m - x r) / n  <=>  a x^2 - 2 b x + c <= 0
    a = r.mean() ** 2 - t2 * cov[1, 1]
    b = m.mean() * r.mean() - t2 * cov[0, 1]
    c = m.mean() ** 2 - t2 * cov[0, 0]
    if a <= 0 or not math.isfinite(point):
        return Estimate(float(point), -math.inf, math.inf, confidence, n, n, "seeds", unbounded=True)
    half = math.sqrt(max(b * b - a * c, 0.0))
    return Estimate(float(point), float((b - half) / a), float((b + half) / a), confidence, n, n, "seeds")


# ---- plots -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityCurve:
    """One method's learning curve over S seeds.

    rounds: [R] round numbers (0 = before training). values: [S, R] (a metric per seed and
    round; NaN where a round was not evaluated). cumulative_bytes: [R] or [S, R] bytes sent up and
    down by the end of each round (averaged over seeds when given per seed).
    """

    rounds: Sequence[int]
    values: np.ndarray
    cumulative_bytes: np.ndarray


def seed_band(values, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and a Student-t interval over seeds at every point: values [S, R] ->
    (mean, low, high), each [R]. This band shows training-seed variation only (the evaluation set
    is fixed); with one seed it collapses onto the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 1:
        data = data[None, :]
    mean = data.mean(0)
    if data.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    half = t_quantile(0.5 + confidence / 2, data.shape[0] - 1) * data.std(0, ddof=1) / math.sqrt(data.shape[0])
    return mean, mean - half, mean + half


# Isolated points of different methods at one round sit this far apart (in rounds) so that their
# error bars do not cover each other.
DODGE_ROUNDS = 0.12


def evaluated_runs(rounds: Sequence[float]) -> list[list[int]]:
    """Indices of ``rounds`` (increasing evaluated round numbers) cut into runs of consecutive rounds:
    [0, 1, 2, 6, 12] -> [[0, 1, 2], [3], [4]]. A curve is drawn as a line with a band only inside a
    run; between runs nothing was measured."""
    runs: list[list[int]] = []
    for i, r in enumerate(rounds):
        if runs and r - rounds[runs[-1][-1]] == 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def quality_figure(panels: Mapping[str, Mapping[str, QualityCurve]], title: str = "",
                   confidence: float = CONFIDENCE):
    """The matplotlib Figure ``plot_quality`` saves (see there)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("nothing to plot: panels is empty")
    fig = Figure(figsize=(11, 3.8 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for row, (ylabel, curves) in enumerate(panels.items()):
        gaps = False
        for k, (method, curve) in enumerate(curves.items()):
            values = np.asarray(curve.values, dtype=np.float64)
            values = values[None, :] if values.ndim == 1 else values
            sent = np.asarray(curve.cumulative_bytes, dtype=np.float64)
            sent = sent.mean(0) if sent.ndim == 2 else sent
            rounds = np.asarray(curve.rounds, dtype=np.float64)
            if not (values.shape[1] == len(rounds) == len(sent)):
                raise ValueError(f"{method}: rounds, values and cumulative_bytes disagree on the number of rounds")
            evaluated = ~np.isnan(values).any(0)
            mean, low, high = seed_band(values[:, evaluated], confidence)
            runs = evaluated_runs(rounds[evaluated])
            gaps = gaps or len(runs) > 1
            colour = f"C{k}"
            label = f"{method} (n={values.shape[0]} seeds)"
            dodge = (k - (len(curves) - 1) / 2) * DODGE_ROUNDS
            alone = np.zeros(len(mean), dtype=bool)
            alone[[run[0] for run in runs if len(run) == 1]] = True
            for col, x in ((0, rounds[evaluated] + dodge * alone), (1, np.maximum(sent[evaluated], 1.0))):
                ax = axes[row][col]
                if len(runs) > 1:
                    ax.plot(x, mean, linestyle=":", linewidth=1, color=colour)
                for i, run in enumerate(runs):
                    tag = label if i == 0 else None
                    if len(run) > 1:
                        ax.plot(x[run], mean[run], marker="o", markersize=3, color=colour, label=tag)
                        ax.fill_between(x[run], low[run], high[run], color=colour, alpha=0.2, linewidth=0)
                    else:
                        ax.errorbar(x[run], mean[run], yerr=[mean[run] - low[run], high[run] - mean[run]], fmt="o",
                                    markersize=4, capsize=3, color=colour, label=tag)
        axes[row][0].set_xlabel("round")
        axes[row][1].set_xlabel("cumulative bytes communicated (up + down)")
        axes[row][1].set_xscale("log")
        for ax in axes[row]:
            if gaps:
                ax.plot([], [], linestyle=":", linewidth=1, color="grey", label="rounds between: not evaluated")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title or f"mean over seeds with {confidence:.0%} CIs over seeds")
    fig.tight_layout()
    return fig


def plot_quality(panels: Mapping[str, Mapping[str, QualityCurve]], path: str, title: str = "",
                 confidence: float = CONFIDENCE) -> str:
    """A PNG with one row per metric (``panels``: y-axis label -> method -> curve) and two
    columns: against rounds and against cumulative bytes (log scale). Means over seeds with their
    ``confidence`` Student-t intervals over seeds: a line and a band over consecutive evaluated
    rounds, a point with error bars where a round stands alone, and a dotted line (no band) across
    rounds that were not evaluated. Headless (Agg canvas, no pyplot)."""
    fig = quality_figure(panels, title, confidence)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
