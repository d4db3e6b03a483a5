"""``ferret-fl compare``: runs per (algorithm, seed) that resume and skip, and a report whose
numbers and verdicts follow from known inputs."""

import functools
import json
import os

import numpy as np
import pytest

from ferret_fl import cli, compare, evaluation, metrics, simulation, stats

TINY = ["model=llama-tiny-shape", "data=synthetic", "rounds=2", "clients_per_round=2", "local_steps=1",
        "max_length=512", "budget=64", "eval_samples=12", "eval_loss_samples=12", "max_new_tokens=2",
        "eval_batch_size=12"]


def _final_losses(out, algorithms, seeds):
    return {(a, s): metrics.read(compare.run_dir(out, a, s))[-1]["eval_loss"] for a in algorithms for s in seeds}


@pytest.mark.slow
def test_compare_runs_resumes_skips_and_reports(tmp_path, monkeypatch):
    algorithms, seeds = ["ferret", "fedavg"], [1, 2]
    out, fresh = str(tmp_path / "cmp"), str(tmp_path / "fresh")
    logs = []
    quiet = dict(algorithms=algorithms, seeds=seeds, sets=TINY, progress=False)

    # An interrupted comparison: every run stops after round 1, and the report still comes out.
    run = simulation.run
    monkeypatch.setattr(simulation, "run", functools.partial(run, stop_after_round=1))
    text = compare.compare(out, log=logs.append, **quiet)
    assert "| ferret | 0 of 2 (2 running) |" in text and "| fedavg | 0 of 2 (2 running) |" in text
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000  # the loss curves of the partial runs
    monkeypatch.setattr(simulation, "run", run)

    # Re-invoked: every run resumes from its round-1 checkpoint and ends where an uninterrupted one does,
    # though a setting only FedPipe reads has changed since (it does not make these runs different).
    text = compare.compare(out, log=logs.append, **{**quiet, "sets": [*TINY, "fedpipe_profiles=64:1"]})
    assert sum("resuming" in line for line in logs) == 4
    assert not any(line.startswith("baselines: evaluating") for line in logs[1:])  # round 0 evaluated once
    compare.compare(fresh, log=lambda s: None, **quiet)
    assert _final_losses(out, algorithms, seeds) == _final_losses(fresh, algorithms, seeds)
    for a in algorithms:
        for s in seeds:
            d = compare.run_dir(out, a, s)
            assert [r["round"] for r in metrics.read(d)] == [0, 1, 2]
            assert not os.path.exists(os.path.join(d, "checkpoint"))  # removed once finished

    for row in ("| echo the input |", "| no training |", "| ferret | 2 of 2 |", "| fedavg | 2 of 2 |",
                "Rouge-L (Ferret code)", "Rouge-L (rouge-score)", "exact match", "Δ Rouge-L",
                "**Ferret vs FedAvg, Rouge-L (Ferret code):**", "**Ferret vs FedAvg, drop in held-out loss:**",
                "held-out loss drop",
                "| ferret | SGD lr 0.0003, 1 steps x 2 examples; K = 64 gaussian bases"):
        assert row in text, row
    with open(os.path.join(out, "comparison.md")) as f:
        assert f.read() == text
    numbers = json.load(open(os.path.join(out, "comparison.json")))
    assert numbers["rows"]["ferret"]["seeds"] == seeds and "ferret" in numbers["gain_ratio"]
    assert numbers["gain_ratio"]["ferret"]["held_out_loss"]["seeds"] == seeds

    # Finished runs are skipped without running anything; changed settings are refused by name.
    monkeypatch.setattr(simulation, "run", lambda *a, **k: pytest.fail("a finished run ran again"))
    logs.clear()
    compare.compare(out, log=logs.append, **quiet)
    assert sum("finished, skipped" in line for line in logs) == 4
    with pytest.raises(ValueError, match="lr: 0.0003 -> 0.002"):
        compare.compare(out, algorithms=algorithms, seeds=seeds, sets=[*TINY, "fedavg.lr=0.002"], progress=False,
                        log=lambda s: None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        compare.compare(out, algorithms=algorithms, seeds=seeds, sets=[*TINY, "max_new_tokens=3"], progress=False,
                        log=lambda s: None)


def test_a_diverged_run_is_recorded_counted_and_skipped(tmp_path, monkeypatch):
    out = str(tmp_path)
    run = simulation.run

    def diverge_seed_2(cfg, **kwargs):
        if cfg.seed == 2:
            raise simulation.DivergedError("round 1: the held-out loss exploded (test)")
        return run(cfg, **kwargs)

    monkeypatch.setattr(simulation, "run", diverge_seed_2)
    quiet = dict(algorithms=["ferret"], seeds=[1, 2], sets=[*TINY, "rounds=1"], progress=False, log=lambda s: None)
    text = compare.compare(out, **quiet)
    assert "| ferret | 1 of 2 (1 diverged (seed 2)) |" in text
    with open(os.path.join(compare.run_dir(out, "ferret", 2), compare.DIVERGED_FILE)) as f:
        assert "exploded (test)" in f.read()
    logs = []
    monkeypatch.setattr(simulation, "run", lambda *a, **k: pytest.fail("ran again"))
    compare.compare(out, **{**quiet, "log": logs.append})
    assert any("seed 2: diverged, skipped" in line for line in logs)


def test_cli_compare_report_only_and_errors(tmp_path, capsys):
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--report-only", "--no-progress"]) == 2
    assert "has `ferret-fl compare` started there" in capsys.readouterr().err
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--set", "ferret.rounds=3", "--report-only"]) == 2
    assert "must be the same for every algorithm" in capsys.readouterr().err
    assert cli.main(["compare", "--output-dir", str(tmp_path), "--set", "imagenet.lr=3", "--report-only"]) == 2
    assert "'imagenet' is not one of the compared algorithms" in capsys.readouterr().err


def test_run_order_puts_ferret_and_fedavg_first():
    configs = compare.build_configs("out", ["fedkseed", "fedit", "fedavg", "ferret"], [3, 1], {}, {})
    assert list(configs) == [("ferret", 3), ("fedavg", 3), ("ferret", 1), ("fedavg", 1), ("fedkseed", 3),
                             ("fedkseed", 1), ("fedit", 3), ("fedit", 1)]
    fedkseed = configs[("fedkseed", 1)]
    assert (fedkseed.local_steps, fedkseed.kseed_lr, fedkseed.kseed_candidates, fedkseed.kseed_eps,
            fedkseed.weighting) == (200, 3e-7, 4096, 5e-4, "samples")
    assert configs[("fedit", 1)].optimizer == "adamw"
    assert {c.data for c in configs.values()} == {"ni-subset"} and {c.rounds for c in configs.values()} == {12}
    assert configs[("ferret", 3)].output_dir == os.path.join("out", "runs", "ferret", "seed-3")


# ---- the report on fabricated runs with known scores ------------------------------------------

TASKS = [f"task{t}" for t in range(6) for _ in range(4)]


def _result(scores: np.ndarray) -> evaluation.EvalResult:
    return evaluation.EvalResult(tuple(TASKS), ("",) * len(TASKS),
                                 {m: np.asarray(scores, dtype=np.float64) for m in evaluation.METRICS})


def _fabricate(out: str, base: np.ndarray, finals: dict[str, list[np.ndarray]], rounds: int = 2,
               final_losses: dict[str, list[float]] | None = None, devices: dict[str, str] | None = None) -> None:
    """A comparison directory whose runs end with the given per-example scores (one array per seed)
    and held-out losses (default 3.0 - rounds / 10; the no-training model's is 3.0)."""
    cfg = compare.build_configs(out, ["fedavg"], [1], {"rounds": rounds}, {})[("fedavg", 1)]
    folder = os.path.join(out, compare.BASELINES)
    os.makedirs(folder)
    _result(base).save(os.path.join(folder, "no-training.json"))
    _result(np.zeros(len(TASKS))).save(os.path.join(folder, "echo.json"))
    initial = metrics.initial_row("fedavg", 3.0, simulation.quality(_result(base)), 1.0)
    compare._write_json(os.path.join(folder, "initial-row.json"), initial)
    for algorithm, per_seed in finals.items():
        for seed, scores in enumerate(per_seed, start=1):
            c = compare.build_configs(out, [algorithm], [seed], {"rounds": rounds, "device": (devices or {}).get(
                algorithm, "cpu")}, {})[(algorithm, seed)]
            os.makedirs(c.output_dir)
            compare._write_json(os.path.join(c.output_dir, compare.CONFIG_FILE), {**vars(c)})
            rows = [dict(initial, algorithm=algorithm)]
            for r in range(1, rounds + 1):
                result = _result(scores) if r == rounds else None
                loss = final_losses[algorithm][seed - 1] if final_losses and r == rounds else 3.0 - r / 10
                rows.append(metrics.round_row(r, algorithm, clients=[0], train_losses=[1.0], eval_loss=loss,
                                              upload_sizes=[1000], downlink_size=1000, previous=rows[-1],
                                              seconds={"local": 60.0}, peak_memory_bytes=1,
                                              quality=simulation.quality(result)))
            metrics.write(c.output_dir, rows)
            os.makedirs(os.path.dirname(simulation.eval_result_path(c.output_dir, rounds)))
            _result(scores).save(simulation.eval_result_path(c.output_dir, rounds))
    assert cfg.rounds == rounds


def _noisy(rng, base, gain, spread):
    return [base + gain + rng.normal(0, spread, base.shape) for _ in range(5)]


@pytest.mark.parametrize("ferret_gain, spread, verdict", [
    (9.5, 0.0, "Ferret keeps at least 90% of FedAvg's gain (0.95 [0.95, 0.95], 5 seeds)"),
    (5.0, 0.0, "Ferret keeps less than 90% of FedAvg's gain (0.50 [0.50, 0.50], 5 seeds)"),
    (9.0, 6.0, "these runs do not show that Ferret keeps 90% of FedAvg's gain"),
])
def test_report_numbers_and_verdict_follow_from_known_scores(tmp_path, ferret_gain, spread, verdict):
    rng = np.random.default_rng(0)
    base = rng.uniform(5, 15, len(TASKS))
    out = str(tmp_path)
    _fabricate(out, base, {"ferret": _noisy(rng, base, ferret_gain, spread), "fedavg": _noisy(rng, base, 10.0, 0.0)})
    text = compare.report(out, replicates=500)
    assert verdict in text
    numbers = json.load(open(os.path.join(out, "comparison.json")))
    ferret, fedavg = numbers["rows"]["ferret"], numbers["rows"]["fedavg"]
    assert fedavg["rouge_l_paper"]["value"] == pytest.approx(base.mean() + 10)
    assert fedavg["rouge_l_paper"]["low"] <= base.mean() + 10 <= fedavg["rouge_l_paper"]["high"]
    difference = ferret["difference_vs_fedavg"]
    assert difference["value"] == pytest.approx(ferret["rouge_l_paper"]["value"] - fedavg["rouge_l_paper"]["value"])
    if spread == 0:
        # Every seed and task gains the same: the intervals collapse onto the exact values.
        assert (difference["low"], difference["high"]) == pytest.approx((ferret_gain - 10,) * 2)
        assert numbers["gain_ratio"]["ferret"]["rouge_l_paper"]["value"] == pytest.approx(ferret_gain / 10)
    assert "| ferret | 5 | 5 |" not in text and "| ferret | 5 |" in text  # the gain-ratio row: 5 paired seeds
    assert "| fedavg | 5 |" in text and "min / run" in text and "| 2.0 |" in text  # 2 rounds x 60 s
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000


@pytest.mark.parametrize("ferret_losses, verdict", [
    ([1.31, 1.30, 1.29, 1.305, 1.295], "Ferret keeps at least 90% of FedAvg's gain (0.99 ["),
    ([2.0, 2.1, 1.9, 2.05, 1.95], "Ferret keeps less than 90% of FedAvg's gain (0.58 ["),
    ([1.3, 2.3, 1.2, 1.9, 1.4], "these runs do not show that Ferret keeps 90% of FedAvg's gain"),
])
def test_the_held_out_loss_ratio_is_fielliers_over_seeds(tmp_path, ferret_losses, verdict):
    base = np.linspace(0, 20, len(TASKS))
    fedavg_losses = [1.28, 1.30, 1.29, 1.31, 1.27]
    out = str(tmp_path)
    _fabricate(out, base, {"ferret": [base + 5] * 5, "fedavg": [base + 6] * 5},
               final_losses={"ferret": ferret_losses, "fedavg": fedavg_losses})
    text = compare.report(out, replicates=200)
    assert f"**Ferret vs FedAvg, drop in held-out loss:** {verdict}" in text
    expected = stats.seed_ratio(3.0 - np.array(ferret_losses), 3.0 - np.array(fedavg_losses))
    got = json.load(open(os.path.join(out, "comparison.json")))["gain_ratio"]["ferret"]["held_out_loss"]
    assert (got["value"], got["low"], got["high"]) == pytest.approx((expected.value, expected.low, expected.high))
    assert got["seeds"] == [1, 2, 3, 4, 5]


def test_report_counts_partial_and_unpaired_seeds(tmp_path):
    base = np.linspace(0, 20, len(TASKS))
    out = str(tmp_path)
    _fabricate(out, base, {"ferret": [base + 1, base + 2, base + 3], "fedavg": [base + 2, base + 2]})
    compare.write_plan(out, ["ferret", "fedavg"], [1, 2, 3, 4, 5])
    text = compare.report(out, replicates=200)
    assert "| ferret | 3 of 5 |" in text and "| fedavg | 2 of 5 |" in text
    assert "| fedit |" not in text  # not planned, so no row
    assert "(2 paired)" in text  # Δ uses the seeds both have
    numbers = json.load(open(os.path.join(out, "comparison.json")))
    assert numbers["rows"]["ferret"]["difference_vs_fedavg"]["seeds"] == [1, 2]
    assert numbers["rows"]["ferret"]["difference_vs_fedavg"]["value"] == pytest.approx(-0.5)


def test_the_plan_is_the_union_of_every_invocation(tmp_path):
    out = str(tmp_path)
    compare.write_plan(out, ["ferret", "fedavg"], [1, 2, 3])
    compare.write_plan(out, ["fedit"], [4])  # a second process running one more algorithm and seed
    compare.write_plan(out, ["fedavg"], [5])
    plan = json.load(open(os.path.join(out, compare.PLAN_FILE)))
    assert plan == {"algorithms": ["ferret", "fedavg", "fedit"], "seeds": [1, 2, 3, 4, 5]}


def test_minutes_show_their_range_when_runs_differ():
    assert compare._minutes_text([26.0, 25.0, 27.0]) == "26.0"
    assert compare._minutes_text([25.0, 29.0, 50.0]) == "34.7 (25–50)"


def test_a_row_run_on_another_device_says_so(tmp_path):
    base = np.linspace(0, 20, len(TASKS))
    out = str(tmp_path)
    _fabricate(out, base, {"ferret": [base + 1], "fedavg": [base + 2], "fedkseed": [base + 1]},
               devices={"fedkseed": "cuda"})
    text = compare.report(out, replicates=200)
    assert "| 2.0 on cuda |" in text  # fedkseed's minutes: 2 rounds x 60 s, on the GPU
    assert text.count(" on cuda |") == 1


def test_a_moved_comparison_is_read_where_it_now_is(tmp_path):
    base = np.linspace(0, 20, len(TASKS))
    made, moved = str(tmp_path / "made"), str(tmp_path / "moved")
    _fabricate(made, base, {"ferret": [base + 1, base + 2], "fedavg": [base + 2, base + 2]})
    os.rename(made, moved)  # every run's config.json still names its directory under made/
    text = compare.report(moved, replicates=200)
    assert "| ferret | 2 |" in text and "| fedavg | 2 |" in text


def test_a_planned_algorithm_without_runs_has_a_row(tmp_path):
    base = np.linspace(0, 20, len(TASKS))
    out = str(tmp_path)
    _fabricate(out, base, {"ferret": [base + 1], "fedavg": [base + 2]})
    compare.write_plan(out, ["ferret", "fedavg", "fedkseed"], [1, 2])
    text = compare.report(out, replicates=200)
    header = next(line for line in text.splitlines() if line.startswith("| row | seeds |"))
    row = next(line for line in text.splitlines() if line.startswith("| fedkseed |"))
    assert row.startswith("| fedkseed | 0 of 2 | –") and row.count("|") == header.count("|")


def test_cli_readme_splices_the_report_between_its_markers(tmp_path, capsys):
    base = np.linspace(0, 20, len(TASKS))
    out = str(tmp_path / "kept")
    _fabricate(out, base, {"ferret": [base + 1, base + 2], "fedavg": [base + 2, base + 2]})
    readme = tmp_path / "README.md"
    start = "<!-- comparison: generated from kept/comparison.md -->"
    readme.write_text(f"# Results\n\nbefore\n\n{start}\nan old table\n<!-- /comparison -->\n\nafter\n")
    args = ["compare", "--output-dir", out, "--report-only", "--no-progress", "--readme", str(readme)]
    assert cli.main(args) == 0
    assert f"readme: {readme} updated" in capsys.readouterr().out
    text = readme.read_text()
    with open(os.path.join(out, "comparison.md")) as f:
        summary = f.read().split(compare.PER_TASK_HEADING)[0].strip()
    assert text == (f"# Results\n\nbefore\n\n{start}\n{summary}\n\n"
                    "![quality against rounds and bytes](kept/comparison.png)\n<!-- /comparison -->\n\nafter\n")
    assert "an old table" not in text and "| ferret | 2 |" in text
    assert cli.main(args) == 0
    assert "already carries this table" in capsys.readouterr().out
    assert readme.read_text() == text


def test_cli_readme_without_its_block_fails_before_running(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    monkeypatch.setattr(compare, "compare", lambda *a, **k: pytest.fail("ran the comparison"))
    out = str(tmp_path / "runs")
    assert cli.main(["compare", "--output-dir", out, "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "has no block for this comparison" in err and "<!-- comparison: generated from runs/comparison.md -->" in err
    assert cli.main(["compare", "--output-dir", out, "--readme", str(tmp_path / "missing.md")]) == 2
    assert "readme: no file" in capsys.readouterr().err
    assert readme.read_text() == "# no markers here\n"
