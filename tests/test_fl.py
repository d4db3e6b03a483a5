"""The reference federated loop on a tiny random LLaMA: Ferret with checkpoint, kill and
resume; one round of each baseline; metrics schema and byte counts; the CLI; the loss guard."""

import json
import os

import pytest
import torch

from ferret_fl import checkpoint, cli, config, evaluation, metrics, report, simulation

TINY = dict(model="llama-tiny-shape", data="synthetic", rounds=2, clients_per_round=2, local_steps=2, batch_size=2,
            grad_accum=2, max_length=512, lr=1e-2, server_lr=1.0, budget=96, kseed_candidates=32, kseed_lr=1e-3,
            eval_samples=4, eval_loss_samples=8, max_new_tokens=4, eval_batch_size=4)

QUIET = dict(progress=False, log=lambda s: None)


def _cfg(tmp_path, name, **overrides):
    return config.load(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


def _weights(run_dir):
    return checkpoint.weights(os.path.join(run_dir, "checkpoint"))


RESUMED = {
    "ferret": {},
    "ferret-momentum-clip": dict(seed_schedule="fixed", server_momentum=0.9, clip_norm=0.05, clip="block"),
    "fedkseed": dict(algorithm="fedkseed"),
}


@pytest.mark.parametrize("setup", list(RESUMED))
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, setup):
    full = _cfg(tmp_path, "full", **RESUMED[setup])
    rows = simulation.run(full, **QUIET)
    assert [r["round"] for r in rows] == [0, 1, 2]

    part = _cfg(tmp_path, "part", **RESUMED[setup])
    simulation.run(part, stop_after_round=1, **QUIET)
    resumed = simulation.run(part, resume=True, **QUIET)
    assert [r["round"] for r in resumed] == [0, 1, 2]
    a, b = _weights(full.output_dir), _weights(part.output_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows[-1]["eval_loss"] == resumed[-1]["eval_loss"]


def test_metrics_schema_and_bytes(tmp_path):
    cfg = _cfg(tmp_path, "ferret", rounds=1)
    rows = simulation.run(cfg, **QUIET)
    lines = metrics.read(cfg.output_dir)
    assert lines == json.loads(json.dumps(rows))
    assert set(metrics.ROW_KEYS) <= set(lines[0])
    row = lines[1]
    assert set(metrics.TRAINED_KEYS) <= set(row) and set(metrics.PHASES) <= set(row["seconds"])
    for key in ("rouge_l_paper", "rouge_l_google", "exact_match", "eval_examples"):
        assert key in lines[0] and key in row, key
    scores = evaluation.EvalResult.load(simulation.eval_result_path(cfg.output_dir, 1))
    counts = {task: scores.tasks.count(task) for task in scores.tasks}
    assert row["eval_examples"] == len(scores.tasks) and len(counts) > 1 and len(set(counts.values())) == 1
    assert row["rouge_l_paper"] == pytest.approx(scores.mean("rouge_l_paper"))
    assert len(row["clients"]) == 2
    assert row["bytes_up"] == 2 * row["bytes_up_per_client"]
    assert row["cumulative_bytes"] == row["bytes_up"] + row["bytes_down"]


def test_metrics_rows_are_checked_on_read(tmp_path):
    good = metrics.initial_row("ferret", 2.5, None, 0.1)
    metrics.write(str(tmp_path), [good, {**good, "round": 1}])
    with pytest.raises(ValueError, match="lacks 'train_loss'"):
        metrics.read(str(tmp_path))
    metrics.write(str(tmp_path), [{**good, "eval_loss": "low"}])
    with pytest.raises(ValueError, match="eval_loss"):
        metrics.read(str(tmp_path))
    metrics.write(str(tmp_path), [good])
    assert metrics.read(str(tmp_path)) == [good]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.read(str(tmp_path / "nothing"))


def test_bytes_equal_encoded_message_sizes(tmp_path):
    import ferret_kernels as fk
    from ferret_fl.algorithms import build_client, build_server
    from ferret_fl.data import load_synthetic, tokenize_examples
    from ferret_fl.models import load_causal_lm

    cfg = _cfg(tmp_path, "bytes")
    model, tok = load_causal_lm(cfg.model)
    server, client = build_server(cfg, model), build_client(cfg, model)
    items = tokenize_examples(load_synthetic().clients[0].examples, tok, cfg.max_length)
    msg = client.train(model, simulation.client_steps(cfg, items, 1, 0, tok.pad_token_id), server.announce(1),
                       client_id=0, num_samples=len(simulation.usable_examples(items)))
    # the payload is what crosses the wire: K coefficients plus counts and a small header
    assert cfg.budget * 4 < len(msg.payload) < cfg.budget * 4 + 2048
    update = fk.decode_client_update(msg.payload, client.plan, round=1)
    assert len(fk.encode_client_update(update)) == len(msg.payload)
    # the sample count is the client's number of examples, not steps x accumulation x batch
    assert update.num_samples == msg.num_samples == len(items) != cfg.local_steps * cfg.grad_accum * cfg.batch_size


BASELINES = {
    "fedavg": {},
    "fedkseed": {},
    "fedit": {},
    "fedpipe": dict(optimizer="adamw", lr=1e-3, fedpipe_adapter_budget=0.05, fedpipe_profiles="64:1,8:0.5"),
}


@pytest.mark.parametrize("algorithm", list(BASELINES))
def test_each_baseline_runs_one_round(tmp_path, algorithm):
    rows = simulation.run(_cfg(tmp_path, algorithm, algorithm=algorithm, rounds=1, **BASELINES[algorithm]), **QUIET)
    assert rows[-1]["round"] == 1 and rows[-1]["bytes_up"] > 0
    assert metrics.finite(rows[-1])
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]


def test_fedavg_sends_the_whole_model_and_ferret_k_numbers(tmp_path):
    fedavg = simulation.run(_cfg(tmp_path, "a", algorithm="fedavg", rounds=1), **QUIET)
    ferret = simulation.run(_cfg(tmp_path, "b", rounds=1), **QUIET)
    d = 51360  # parameters of llama-tiny-shape
    assert fedavg[-1]["bytes_up_per_client"] >= 4 * d
    assert ferret[-1]["bytes_up_per_client"] < 4 * TINY["budget"] + 2048


def test_cli_run_and_report(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["run", "--model", "llama-tiny-shape", "--rounds", "1", "--clients-per-round", "1",
                     "--local-steps", "1", "--budget", "64", "--max-length", "512", "--eval-samples", "2",
                     "--max-new-tokens", "2", "--output-dir", str(out), "--no-progress",
                     "--set", "eval_loss_samples=4"])
    assert code == 0
    assert "| ferret |" in capsys.readouterr().out
    png = tmp_path / "plot.png"
    assert cli.main(["report", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "ferret" in report.compare([str(out)])


def test_cli_refuses_unknown_settings(tmp_path, capsys):
    assert cli.main(["run", "--set", "budgit=3", "--output-dir", str(tmp_path)]) == 2
    assert "unknown setting 'budgit'" in capsys.readouterr().err


def test_cli_has_a_flag_with_help_for_every_setting(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for name, f in config.FIELDS.items():
        assert "--" + name.replace("_", "-") in text
        assert f.metadata["help"]


@pytest.mark.parametrize("name", sorted(config.CHOICES))
def test_every_choice_setting_is_refused_before_any_work(tmp_path, capsys, name):
    out = tmp_path / "out"
    assert cli.main(["run", "--set", f"{name}=bogus", "--output-dir", str(out)]) == 2
    assert name in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        cli.main(["run", "--" + name.replace("_", "-"), "bogus", "--output-dir", str(out)])
    assert not out.exists()


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: fedavg\nrounds: 7\nlr: 0.001\nclip_norm: null\nmax_grad_norm: 2\n")
    cfg = config.load(str(path), {"rounds": "3", "clip_norm": "0.5"})
    assert (cfg.algorithm, cfg.rounds, cfg.lr, cfg.clip_norm, cfg.max_grad_norm) == ("fedavg", 3, 0.001, 0.5, 2.0)
    assert config.load(None, {"clip_norm": "null"}).clip_norm is None
    with pytest.raises(ValueError, match="algorithm"):
        config.load(None, {"algorithm": "fedsgd"})
    with pytest.raises(ValueError, match="rounds must be an int"):
        config.load(None, {"rounds": 2.5})
    with pytest.raises(ValueError, match="seed_schedule=fixed"):
        config.load(None, {"server_momentum": 0.9})
    with pytest.raises(ValueError, match="divergence_factor"):
        config.load(None, {"divergence_factor": 0.5})


def test_wire_dtypes_come_from_the_library():
    from ferret_kernels import wire

    assert config.CHOICES["coefficient_dtype"] == tuple(wire.DTYPES)


def test_defaults_and_shipped_configs_follow_the_server_step_rule():
    """scale paper with the paper's server lr (10 on NI, 3 on Dolly), or unbiased with a third of it."""
    import glob

    def paper_rule(cfg, paper_lr):
        return (cfg.scale, cfg.server_lr) == ("paper", paper_lr) or (
            cfg.scale == "unbiased" and cfg.server_lr == pytest.approx(paper_lr / 3))

    assert paper_rule(config.RunConfig(), 10.0)
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(paths) >= 5
    for path in paths:
        cfg = config.load(path)
        assert cfg.budget == 7800 and cfg.lr == 1e-4
        assert paper_rule(cfg, 3.0 if "dolly" in os.path.basename(path) else 10.0), path


def test_run_config_reaches_every_data_source(tmp_path):
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    dolly = simulation.load_dataset(_cfg(tmp_path, "d", data=f"dolly:{fixtures}/dolly_sample.jsonl", num_clients=4,
                                         min_client_samples=3))
    assert dolly.num_clients == 4 and dolly.eval_tasks == ("summarization",)
    ni = simulation.load_dataset(_cfg(tmp_path, "n", data=f"ni:{fixtures}/natural_instructions"))
    assert ni.num_clients >= 1 and len(ni.eval_examples) > 0
    subset = simulation.load_dataset(_cfg(tmp_path, "s", data="ni-subset"))
    assert subset.num_clients == 26 and len(subset.eval_tasks) == 13
    with pytest.raises(ValueError, match="data"):
        simulation.load_dataset(_cfg(tmp_path, "x", data="imagenet"))


def test_evaluation_sets_are_fixed_across_training_seeds(tmp_path):
    from ferret_fl.models import load_causal_lm

    _, tokenizer = load_causal_lm("llama-tiny-shape")
    sets = []
    for seed in (1, 7):
        cfg = _cfg(tmp_path, f"s{seed}", seed=seed, eval_samples=30, eval_loss_samples=13)
        evaluator = simulation.Evaluator(cfg, simulation.load_dataset(cfg), tokenizer)
        sets.append((evaluator.generation_set, evaluator.loss_set))
    assert sets[0] == sets[1]
    generation, loss = sets[0]
    tasks = simulation.load_dataset(_cfg(tmp_path, "t")).eval_tasks
    assert generation.tasks == loss.tasks == tasks  # every held-out task, in equal numbers
    assert len(generation) == len(tasks) * (30 // len(tasks)) and len(loss) == len(tasks)


def test_resume_refuses_changed_settings(tmp_path):
    cfg = _cfg(tmp_path, "r", rounds=1)
    simulation.run(cfg, **QUIET)
    changed = _cfg(tmp_path, "r", rounds=2, budget=80)
    with pytest.raises(ValueError, match="budget"):
        simulation.run(changed, resume=True, **QUIET)


def test_divergence_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "boom"
    code = cli.main(["run", "--model", "llama-tiny-shape", "--rounds", "3", "--clients-per-round", "2",
                     "--local-steps", "2", "--budget", "96", "--max-length", "512", "--eval-samples", "2",
                     "--max-new-tokens", "2", "--eval-loss-samples", "8", "--lr", "0.05", "--server-lr", "3000",
                     "--scale", "unbiased", "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert "diverged" in err and "server_lr=3000.0" in err and "clip_norm" in err
    rows = metrics.read(str(out))
    assert rows[-1]["round"] >= 1
    stopped = rows[-1]["round"]
    if stopped > 1:
        assert checkpoint.read_state(str(out / "checkpoint"))["round"] == stopped - 1
    else:
        assert not checkpoint.exists(str(out / "checkpoint"))


def test_divergence_rule():
    cfg = config.RunConfig(divergence_factor=1.5)
    rows = [{"round": 0, "eval_loss": 4.0}, {"round": 1, "eval_loss": 2.0}]
    simulation.check_divergence(cfg, rows, {"round": 2, "eval_loss": 2.9, "train_loss": 1.0})
    with pytest.raises(simulation.DivergedError, match=r"1\.6x the best so far \(2\.0000 at round 1"):
        simulation.check_divergence(cfg, rows, {"round": 2, "eval_loss": 3.1, "train_loss": 1.0})
    with pytest.raises(simulation.DivergedError, match="not finite"):
        simulation.check_divergence(config.RunConfig(divergence_factor=0), rows,
                                    {"round": 2, "eval_loss": float("nan"), "train_loss": 1.0})
    simulation.check_divergence(config.RunConfig(divergence_factor=0), rows,
                                {"round": 2, "eval_loss": 100.0, "train_loss": 1.0})


def test_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    from ferret_fl.models import load_causal_lm

    model, _ = load_causal_lm("llama-tiny-shape")
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, model, {"round": torch.tensor(2)}, {"round": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def crash(path, write):
        if path.endswith(checkpoint.STATE_FILE):
            raise KeyboardInterrupt
        write(path)

    monkeypatch.setattr(checkpoint, "_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(d, model, {"round": torch.tensor(3)}, {"round": 2})
    monkeypatch.undo()
    server, state = checkpoint.load(d, model)
    assert state["round"] == 1 and int(server["round"]) == 2
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
