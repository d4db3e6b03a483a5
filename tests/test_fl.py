"""The reference federated loop on a tiny random LLaMA: Ferret with checkpoint, kill and
resume; one round of each baseline; metrics schema and byte counts; the CLI."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ferret_fl import cli, config, report, simulation

TINY = dict(model="llama-tiny-shape", data="synthetic", rounds=2, clients_per_round=2, local_steps=2, batch_size=2,
            grad_accum=2, max_length=512, lr=1e-2, server_lr=1.0, budget=96, kseed_candidates=32, kseed_lr=1e-3,
            eval_samples=4, eval_loss_samples=8, max_new_tokens=4, eval_batch_size=4)

ROW_KEYS = {"round", "algorithm", "eval_loss", "bytes_up", "bytes_down", "cumulative_bytes", "clients", "seconds"}
TRAINED_KEYS = ROW_KEYS | {"train_loss", "bytes_up_per_client", "bytes_down_per_client", "peak_memory_bytes"}
PHASES = {"local", "compress", "aggregate", "apply", "evaluation"}


def _cfg(tmp_path, name, **overrides):
    return config.load(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


def _weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoint", "model.safetensors"))


def test_ferret_kill_and_resume_matches_uninterrupted_run(tmp_path):
    full = _cfg(tmp_path, "full")
    rows = simulation.run(full, progress=False, log=lambda s: None)
    assert [r["round"] for r in rows] == [0, 1, 2]

    part = _cfg(tmp_path, "part")
    simulation.run(part, progress=False, stop_after_round=1, log=lambda s: None)
    resumed = simulation.run(part, resume=True, progress=False, log=lambda s: None)
    assert [r["round"] for r in resumed] == [0, 1, 2]
    a, b = _weights(full.output_dir), _weights(part.output_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows[-1]["eval_loss"] == resumed[-1]["eval_loss"]


def test_metrics_schema_and_bytes(tmp_path):
    cfg = _cfg(tmp_path, "ferret", rounds=1)
    rows = simulation.run(cfg, progress=False, log=lambda s: None)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines == json.loads(json.dumps(rows))
    assert ROW_KEYS <= set(lines[0])
    row = lines[1]
    assert TRAINED_KEYS <= set(row) and PHASES <= set(row["seconds"])
    assert "rouge_l" in lines[0] and "rouge_l" in row
    assert len(row["clients"]) == 2
    assert row["bytes_up"] == 2 * row["bytes_up_per_client"]
    assert row["cumulative_bytes"] == row["bytes_up"] + row["bytes_down"]


def test_bytes_equal_encoded_message_sizes(tmp_path):
    from ferret_fl.algorithms import build_algorithm
    from ferret_fl.data import load_synthetic, tokenize_examples
    from ferret_fl.models import load_causal_lm

    cfg = _cfg(tmp_path, "bytes")
    model, tok = load_causal_lm(cfg.model)
    algo = build_algorithm(cfg, model)
    items = tokenize_examples(load_synthetic().clients[0].examples, tok, cfg.max_length)
    msg = algo.client_update(model, simulation.client_steps(cfg, items, 1, 0, tok.pad_token_id), 1, 0)
    # the payload is what crosses the wire: K coefficients plus counts and a small header
    assert cfg.budget * 4 < len(msg.payload) < cfg.budget * 4 + 2048
    import ferret_kernels as fk

    update = fk.decode_client_update(msg.payload, algo.plan, round=1)
    assert len(fk.encode_client_update(update)) == len(msg.payload)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedkseed", "fedit"])
def test_each_baseline_runs_one_round(tmp_path, algorithm):
    rows = simulation.run(_cfg(tmp_path, algorithm, algorithm=algorithm, rounds=1), progress=False,
                          log=lambda s: None)
    assert rows[-1]["round"] == 1 and rows[-1]["bytes_up"] > 0
    assert all(torch.isfinite(torch.tensor(rows[-1]["eval_loss"])) for _ in [0])


def test_fedavg_sends_the_whole_model_and_ferret_k_numbers(tmp_path):
    fedavg = simulation.run(_cfg(tmp_path, "a", algorithm="fedavg", rounds=1), progress=False, log=lambda s: None)
    ferret = simulation.run(_cfg(tmp_path, "b", rounds=1), progress=False, log=lambda s: None)
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


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: fedavg\nrounds: 7\nlr: 0.001\n")
    cfg = config.load(str(path), {"rounds": "3"})
    assert (cfg.algorithm, cfg.rounds, cfg.lr) == ("fedavg", 3, 0.001)
    with pytest.raises(ValueError, match="algorithm"):
        config.load(None, {"algorithm": "fedsgd"})


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(paths) >= 5
    for path in paths:
        cfg = config.load(path)
        assert cfg.budget == 7800 and cfg.lr == 1e-4


def test_run_config_reaches_every_data_source(tmp_path):
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    dolly = simulation.load_dataset(_cfg(tmp_path, "d", data=f"dolly:{fixtures}/dolly_sample.jsonl", num_clients=4,
                                         min_client_samples=3))
    assert dolly.num_clients == 4 and dolly.eval_tasks == ("summarization",)
    ni = simulation.load_dataset(_cfg(tmp_path, "n", data=f"ni:{fixtures}/natural_instructions"))
    assert ni.num_clients >= 1 and len(ni.eval_examples) > 0
    with pytest.raises(ValueError, match="data"):
        simulation.load_dataset(_cfg(tmp_path, "x", data="imagenet"))


def test_resume_refuses_changed_settings(tmp_path):
    cfg = _cfg(tmp_path, "r", rounds=1)
    simulation.run(cfg, progress=False, log=lambda s: None)
    changed = _cfg(tmp_path, "r", rounds=2, budget=80)
    with pytest.raises(ValueError, match="budget"):
        simulation.run(changed, resume=True, progress=False, log=lambda s: None)
