"""Byzantine clients (ferret_fl.attacks) and the server's defences in the reference loop."""

import pytest
import torch

from ferret_fl import attacks, checkpoint, config, simulation
from ferret_fl.models import load_causal_lm
from ferret_kernels import FerretPlan, round_seed, wire

TINY = dict(model="llama-tiny-shape", data="synthetic", rounds=2, clients_per_round=4, local_steps=2, batch_size=2,
            grad_accum=1, max_length=512, lr=1e-2, server_lr=1.0, budget=96, eval_samples=4, eval_loss_samples=8,
            max_new_tokens=4, eval_batch_size=4)
QUIET = dict(progress=False, log=lambda s: None)


def test_attackers_are_an_exact_seeded_share_of_the_round():
    clients = list(range(10))
    for fraction, n in ((0.0, 0), (0.1, 1), (0.2, 2), (0.5, 5)):
        picked = attacks.attackers(7, 3, clients, fraction)
        assert len(picked) == n and picked <= set(clients)
        assert picked == attacks.attackers(7, 3, clients, fraction)
    assert attacks.attackers(7, 3, clients, 0.5) != attacks.attackers(7, 4, clients, 0.5)


@pytest.fixture(scope="module")
def honest():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    plan = FerretPlan.from_model(model, budget=24)
    with plan.client_round(model, round=2, seed=round_seed(1, 2), num_samples=3) as cr:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
    return plan, cr.update, wire.encode_client_update(cr.update)


@pytest.mark.parametrize("attack", config.ATTACKS)
def test_a_forged_upload_decodes_and_carries_the_attack(honest, attack):
    plan, update, payload = honest
    forged = wire.decode_client_update(attacks.corrupt(payload, plan, attack, round_index=2, seed=1, client_id=5),
                                       plan, round=2)
    assert (forged.seed, forged.counts, forged.num_samples) == (update.seed, update.counts, update.num_samples)
    gamma, bad = update.coefficients.double(), forged.coefficients.double()
    if attack == "scaled":
        torch.testing.assert_close(bad, gamma * -100, rtol=1e-6, atol=0)
    elif attack == "sign_flip":
        assert torch.equal(bad, -gamma)
    else:
        torch.testing.assert_close(bad.norm(), 100 * gamma.norm(), rtol=1e-5, atol=0)
        assert abs(torch.nn.functional.cosine_similarity(bad, gamma, dim=0)) < 0.9


def _weights(tmp_path, name, round_index=None):
    if round_index == 0:
        model, _ = load_causal_lm(TINY["model"], seed=42)
        return {k: v.detach().clone() for k, v in model.named_parameters()}
    return checkpoint.weights(str(tmp_path / name / "checkpoint"))


def _run(tmp_path, name, **overrides):
    cfg = config.load(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})
    return simulation.run(cfg, **QUIET)


def test_a_scaled_attacker_is_refused_by_default_and_moves_the_model_without_defences(tmp_path):
    clean = _run(tmp_path, "clean")
    defended = _run(tmp_path, "defended", byzantine_fraction=0.25, attack="scaled")
    open_door = _run(tmp_path, "open", byzantine_fraction=0.25, attack="scaled", influence_cap="null", max_step="null")
    for row in defended[1:]:
        assert len(row["byzantine"]) == 1
        assert [x["client_id"] for x in row["refusals"]] == row["byzantine"]
        assert {x["reason"] for x in row["refusals"]} == {"influence"}
    assert all("refusals" not in row for row in clean + open_door)
    start = _weights(tmp_path, "clean", 0)
    moved = {name: sum(float((w - start[k]).double().norm() ** 2) for k, w in _weights(tmp_path, name).items()) ** 0.5
             for name in ("clean", "defended", "open")}
    assert moved["open"] > 20 * moved["clean"]
    assert moved["defended"] < 2 * moved["clean"]


def test_byzantine_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match="byzantine_fraction"):
        config.load(None, {"byzantine_fraction": 1.5})
    with pytest.raises(ValueError, match="algorithm=ferret"):
        config.load(None, {"byzantine_fraction": 0.1, "algorithm": "fedavg"})
    with pytest.raises(ValueError, match="attack must be one of"):
        config.load(None, {"attack": "poison"})
    with pytest.raises(ValueError, match="aggregation must be one of"):
        config.load(None, {"aggregation": "mode"})
