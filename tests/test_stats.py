"""Statistics: t quantiles, the crossed bootstrap against closed forms and planted effects, the
gain ratio, and the plot helper."""

import math

import numpy as np
import pytest

from ferret_fl.stats import (
    QualityCurve,
    evaluated_runs,
    gain_ratio,
    mean_ci,
    paired_difference,
    plot_quality,
    quality_figure,
    seed_band,
    seed_ratio,
    t_quantile,
)

S, T, PER_TASK = 5, 13, 16
TASKS = np.repeat([f"task{t:02d}" for t in range(T)], PER_TASK)


def _scores(rng, mu, seed_sd, task_sd, noise_sd, task_effects=None):
    """[S, T * PER_TASK] scores = mu + seed effect + task effect + noise."""
    tasks = rng.normal(0, task_sd, T) if task_effects is None else task_effects
    values = mu + rng.normal(0, seed_sd, S)[:, None, None] + tasks[None, :, None] + rng.normal(0, noise_sd, (S, T, PER_TASK))
    return values.reshape(S, T * PER_TASK)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    # Reference values of Student's t quantiles (SciPy's stats.t.ppf).
    [(0.975, 1, 12.706204736), (0.975, 4, 2.776445105), (0.975, 12, 2.178812830), (0.95, 30, 1.697260887),
     (0.975, 2.5, 3.574654842), (0.025, 7.3, -2.345066737), (0.995, 3.7, 4.869252253), (0.975, math.inf, 1.959963985)],
)
def test_t_quantile(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-8)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must"):
        t_quantile(0.9, 0)


def test_mean_ci_is_deterministic_and_matches_the_two_way_t_interval():
    rng = np.random.default_rng(0)
    scores = _scores(rng, 30.0, seed_sd=3.0, task_sd=1.0, noise_sd=10.0)
    a = mean_ci(scores, TASKS, seed=4)
    assert a == mean_ci(scores, TASKS, seed=4)
    assert a.value == pytest.approx(scores.mean()) and a.low < a.value < a.high
    assert (a.n_seeds, a.n_units, a.unit) == (S, T, "task")
    # The interval is at least the Welch-Satterthwaite t interval of the seed and task components.
    cells = scores.reshape(S, T, PER_TASK).mean(2)
    var_seeds, var_tasks = cells.mean(1).var(ddof=1) / S, cells.mean(0).var(ddof=1) / T
    df = (var_seeds + var_tasks) ** 2 / (var_seeds**2 / (S - 1) + var_tasks**2 / (T - 1))
    half = t_quantile(0.975, df) * math.sqrt(var_seeds + var_tasks)
    assert a.high - a.low >= 2 * half * 0.97
    assert a.high - a.low <= 2 * half * 1.5


def test_single_row_resamples_units_only():
    rng = np.random.default_rng(1)
    row = rng.normal(50.0, 10.0, 400)
    estimate = mean_ci(row, seed=0)
    assert (estimate.n_seeds, estimate.n_units, estimate.unit) == (1, 400, "example")
    half = 1.966 * row.std(ddof=1) / math.sqrt(400)  # t(399)
    assert estimate.low == pytest.approx(row.mean() - half, rel=0.01)
    assert estimate.high == pytest.approx(row.mean() + half, rel=0.01)
    constant = mean_ci(np.full((3, 10), 7.0))
    assert (constant.low, constant.value, constant.high) == (7.0, 7.0, 7.0)


def test_paired_difference_removes_shared_variation():
    rng = np.random.default_rng(2)
    shared = _scores(rng, 20.0, seed_sd=5.0, task_sd=15.0, noise_sd=20.0)
    better = shared + 1.0 + rng.normal(0, 1.0, shared.shape)
    paired = paired_difference(better, shared, TASKS)
    assert paired.covers(1.0) and paired.low > 0  # the shared noise cancels
    unpaired_width = (mean_ci(better, TASKS).high - mean_ci(better, TASKS).low)
    assert paired.high - paired.low < unpaired_width / 5
    baseline = shared[0]
    against_row = paired_difference(better, baseline, TASKS)
    assert against_row.value == pytest.approx((better - baseline).mean())


def test_paired_difference_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(np.zeros((5, 8)), np.zeros((4, 8)))
    with pytest.raises(ValueError, match="same evaluation set"):
        paired_difference(np.zeros((5, 8)), np.zeros((5, 9)))
    with pytest.raises(ValueError, match="one task per example"):
        paired_difference(np.zeros((5, 8)), np.zeros((5, 8)), tasks=["a"] * 7)
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, np.nan])


def test_difference_interval_covers_a_planted_effect_at_the_nominal_rate():
    # 5 seeds x 13 tasks x 16 examples, the seed effect dominant: the hardest case for few seeds
    # (a plain percentile bootstrap covers about 81% here).
    rng = np.random.default_rng(2409)
    trials, covered = 200, 0
    for trial in range(trials):
        baseline = rng.normal(0, 10.0, T * PER_TASK)
        treated = baseline + _scores(rng, 2.0, seed_sd=2.0, task_sd=0.5, noise_sd=10.0)
        covered += paired_difference(treated, baseline, TASKS, replicates=1000, seed=trial).covers(2.0)
    # Binomial(200, 0.95): 180 or fewer happens with probability < 0.3%.
    assert covered > 180


def test_gain_ratio_finds_a_planted_ratio():
    rng = np.random.default_rng(3)
    base = rng.normal(20.0, 5.0, T * PER_TASK)
    fedavg = base + _scores(rng, 10.0, seed_sd=0.5, task_sd=1.0, noise_sd=3.0)
    ferret = base + _scores(rng, 8.0, seed_sd=0.5, task_sd=1.0, noise_sd=3.0)
    ratio = gain_ratio(ferret, fedavg, base, TASKS, seed=0)
    assert ratio.covers(0.8) and not ratio.unbounded
    assert 0.6 < ratio.low < 0.8 < ratio.high < 1.0
    assert ratio.value == pytest.approx((ferret.mean() - base.mean()) / (fedavg.mean() - base.mean()))


def test_gain_ratio_is_unbounded_when_the_reference_gain_is_not_positive():
    rng = np.random.default_rng(4)
    base = rng.normal(20.0, 5.0, T * PER_TASK)
    no_gain = base + _scores(rng, 0.0, seed_sd=1.0, task_sd=1.0, noise_sd=3.0)
    ferret = base + _scores(rng, 3.0, seed_sd=1.0, task_sd=1.0, noise_sd=3.0)
    ratio = gain_ratio(ferret, no_gain, base, TASKS)
    assert ratio.unbounded and (ratio.low, ratio.high) == (-math.inf, math.inf)
    assert not gain_ratio(ferret, ferret, base, TASKS).unbounded


def _paired_t(m, r, ratio):
    d = m - ratio * r
    return d.mean() / (d.std(ddof=1) / math.sqrt(d.size))


@pytest.mark.parametrize("case", range(6))
def test_seed_ratio_ends_are_where_the_paired_t_test_stops_rejecting(case):
    rng = np.random.default_rng(case)
    reference = rng.normal(1.7, 0.08, 5)
    method = 0.95 * reference + rng.normal(0, 0.05, 5)
    e = seed_ratio(method, reference)
    assert not e.unbounded and e.low < e.value < e.high and e.n_seeds == 5
    assert e.value == pytest.approx(method.mean() / reference.mean())
    critical = t_quantile(0.975, 4)
    for end in (e.low, e.high):
        assert abs(_paired_t(method, reference, end)) == pytest.approx(critical, rel=1e-9)
    assert abs(_paired_t(method, reference, (e.low + e.value) / 2)) < critical
    assert abs(_paired_t(method, reference, e.high + 0.01)) > critical


def test_seed_ratio_covers_a_planted_ratio_at_the_nominal_rate():
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(2000):
        seed_effect = rng.normal(0, 0.1, 5)
        reference = 1.7 + seed_effect + rng.normal(0, 0.05, 5)
        method = 0.9 * 1.7 + seed_effect * 0.9 + rng.normal(0, 0.05, 5)
        hits += seed_ratio(method, reference).covers(0.9)
    assert 0.93 < hits / 2000 < 0.97


def test_seed_ratio_is_unbounded_without_a_reference_gain_and_refuses_bad_input():
    rng = np.random.default_rng(5)
    e = seed_ratio(rng.normal(1.0, 0.1, 5), rng.normal(0.0, 0.5, 5))
    assert e.unbounded and (e.low, e.high) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="same length >= 2"):
        seed_ratio([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="same length >= 2"):
        seed_ratio([1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        seed_ratio([1.0, math.nan], [1.0, 2.0])


def test_seed_band():
    values = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    mean, low, high = seed_band(values)
    half = t_quantile(0.975, 2) * 1.0 / math.sqrt(3)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(low, [2.0 - half, 2.0])
    np.testing.assert_allclose(high, [2.0 + half, 2.0])
    one = seed_band([[1.0, 5.0]])
    np.testing.assert_array_equal(one[1], one[2])


def test_plot_quality_writes_a_png(tmp_path):
    rng = np.random.default_rng(5)
    rounds = list(range(6))
    rouge = {name: QualityCurve(rounds, 20 + np.cumsum(rng.normal(1, 0.5, (5, 6)), axis=1),
                                np.cumsum(np.full(6, size))) for name, size in (("ferret", 1e4), ("fedavg", 1e9))}
    sparse = np.full((5, 6), np.nan)
    sparse[:, ::2] = rng.normal(30, 2, (5, 3))
    loss = {"ferret": QualityCurve(rounds, sparse, np.cumsum(np.full((5, 6), 1e4), axis=1))}
    path = plot_quality({"Rouge-L (%)": rouge, "held-out loss": loss}, str(tmp_path / "plots" / "quality.png"))
    with open(path, "rb") as reader:
        assert reader.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="disagree"):
        plot_quality({"x": {"m": QualityCurve([0, 1], np.zeros((2, 3)), np.zeros(3))}}, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_quality({}, str(tmp_path / "empty.png"))


def test_evaluated_runs_cut_at_unevaluated_rounds():
    assert evaluated_runs([0, 1, 2, 6, 12]) == [[0, 1, 2], [3], [4]]
    assert evaluated_runs([0, 12]) == [[0], [1]]
    assert evaluated_runs(list(range(13))) == [list(range(13))]
    assert evaluated_runs([]) == []


def test_quality_figure_draws_no_band_across_rounds_not_evaluated():
    from matplotlib.collections import PolyCollection

    rng = np.random.default_rng(3)
    rounds = list(range(13))
    dense = rng.normal(3, 0.1, (5, 13))
    ends = np.full((5, 13), np.nan)
    ends[:, [0, 12]] = rng.normal(15, 1, (5, 2))
    sent = np.cumsum(np.full(13, 1e6))
    fig = quality_figure({"loss": {"a": QualityCurve(rounds, dense, sent), "b": QualityCurve(rounds, dense + 1, sent)},
                          "rouge": {"a": QualityCurve(rounds, ends, sent), "b": QualityCurve(rounds, ends + 1, sent)}})
    (loss_rounds, loss_bytes), (rouge_rounds, rouge_bytes) = fig.axes[0:2], fig.axes[2:4]
    for ax in (loss_rounds, loss_bytes):
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2 and not ax.containers
        assert all(line.get_linestyle() != ":" for line in ax.lines)
    for ax in (rouge_rounds, rouge_bytes):
        assert not any(isinstance(c, PolyCollection) for c in ax.collections)
        assert len(ax.containers) == 4  # an error bar per method and evaluated round
        assert sum(line.get_linestyle() == ":" for line in ax.lines) == 3  # two connectors and the legend's key
    # the two methods' bars at one round stand apart on the rounds axis, not on the bytes axis
    xs = sorted(float(bar.lines[0].get_xdata()[0]) for bar in rouge_rounds.containers)
    assert xs == pytest.approx([-0.06, 0.06, 11.94, 12.06])
    mean, low, high = seed_band(ends[:, [0]])
    bar = rouge_rounds.containers[0]
    assert float(bar.lines[0].get_ydata()[0]) == pytest.approx(mean[0])
    segments = bar.lines[2][0].get_segments()
    assert segments[0][:, 1] == pytest.approx([low[0], high[0]])
