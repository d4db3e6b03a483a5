"""Client rounds, aggregation and replay against dense float64 references built from the
RNG contract; unbiasedness; a tiny LLaMA round with bitwise client replay; refusals;
the Hugging Face Trainer callback."""

import copy

import pytest
import torch

import ferret_kernels.functional as functional
from ferret_kernels import rng
from ferret_kernels.client import ClientRound, ClientUpdate
from ferret_kernels.plan import FerretPlan, coefficient_blocks, parity_factor
from ferret_kernels.server import Aggregator, GlobalUpdate

BACKEND = "torch"


def tiny_model(seed=0, sizes=(6, 5, 3)):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
                               torch.nn.Linear(sizes[1], sizes[2]))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def nudge(model, seed, scale=0.05):
    """Stand-in for local training: a fixed pseudo-random step per parameter, larger on
    the first tensor so the norm allocation is uneven."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale * (3.0 if i == 0 else 1.0))


def dense_basis(seed, block, K, d) -> torch.Tensor:
    """float64 (K, d) from the pointwise contract."""
    return rng.elements(seed, block, torch.arange(K)[:, None], torch.arange(d)[None, :]).double()


def dense_rebuild(plan, seed, counts, coefficients) -> torch.Tensor:
    """float64 sum_l V_l^T gamma_l laid out as the flat parameter vector."""
    out, start = [], 0
    for b, (d, K) in enumerate(zip(plan.block_sizes, counts, strict=True)):
        out.append(dense_basis(seed, b, K, d).T @ coefficients[start:start + K].double())
        start += K
    return torch.cat(out)


def client_update(plan, model, *, seed, nudge_seed, round=0, step=0.05, **options):
    """One client round on a copy of ``model``; returns (update, float64 delta)."""
    c = copy.deepcopy(model)
    with plan.client_round(c, round=round, seed=seed, **options) as cr:
        nudge(c, nudge_seed, step)
        end = flat(c)
    return cr.update, flat(model) - end


@pytest.mark.parametrize("shared", [True, False], ids=["shared-seed", "own-seeds"])
@pytest.mark.parametrize("weighting", ["samples", "equal"])
def test_round_matches_dense_float64(shared, weighting):
    model = tiny_model()
    plan = FerretPlan.from_model(model, 17, backend=BACKEND)
    agg = Aggregator(plan, server_lr=0.7, weighting=weighting, base_seed=5)
    rho = rng.VARIANCE[plan.distribution]
    expected_step = torch.zeros(plan.numel, dtype=torch.float64)
    samples = [3, 1, 6]
    weights = torch.tensor(samples if weighting == "samples" else [1, 1, 1], dtype=torch.float64)
    weights /= weights.sum()
    for i, allocation in enumerate(["norm", "uniform", "size"]):
        seed = agg.seed if shared else 11 + i
        update, delta = client_update(plan, model, seed=seed, nudge_seed=i, num_samples=samples[i],
                                      allocation=allocation)
        assert sum(update.counts) == 17 and min(update.counts) >= 1
        ref, start = [], 0
        for b, (d, K) in enumerate(zip(plan.block_sizes, update.counts, strict=True)):
            ref.append(dense_basis(seed, b, K, d) @ delta[start:start + d] / (rho * K))
            start += d
        torch.testing.assert_close(update.coefficients.double(), torch.cat(ref), rtol=1e-5, atol=1e-7)
        expected_step += weights[i] * dense_rebuild(plan, seed, update.counts, update.coefficients)
        agg.add(update)
    server = copy.deepcopy(model)
    g = agg.apply_(server)
    assert len(g.seeds) == (1 if shared else 3)
    torch.testing.assert_close(flat(server), flat(model) - 0.7 * expected_step, rtol=0, atol=1e-6)
    assert agg.round == 1 and len(agg) == 0


def test_shared_seed_merge_equals_separate_rebuilds():
    model = tiny_model(1, (8, 6, 4))
    plan = FerretPlan.from_model(model, 20, backend=BACKEND)
    agg = Aggregator(plan, weighting="equal")
    updates = [client_update(plan, model, seed=agg.seed, nudge_seed=i, allocation=a)[0]
               for i, a in enumerate(["norm", "uniform", "sqrt_norm", "size"])]
    assert len({u.counts for u in updates}) > 1, "clients should differ in counts to exercise the padding"
    separate = torch.zeros(plan.numel, dtype=torch.float64)
    for u in updates:
        out = [torch.zeros(n) for n in plan.numels]
        functional.reconstruct_blocks_(out, plan.block_sizes, u.counts, u.coefficients, u.seed, backend=BACKEND)
        separate += torch.cat([o.reshape(-1) for o in out]).double() / len(updates)
        agg.add(u)
    g = agg.aggregate()
    assert len(g.seeds) == 1 and g.counts[0] == tuple(max(c) for c in zip(*(u.counts for u in updates), strict=True))
    merged = [torch.zeros(n) for n in plan.numels]
    functional.reconstruct_blocks_(merged, plan.block_sizes, g.counts[0], g.coefficients[0], g.seeds[0],
                                   backend=BACKEND)
    torch.testing.assert_close(torch.cat([m.reshape(-1) for m in merged]).double(), separate, rtol=1e-5, atol=1e-6)


def test_one_launch_per_phase(monkeypatch):
    calls = {"project_blocks": 0, "reconstruct_blocks_": 0}
    for name in calls:
        original = getattr(functional, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(functional, name, counted)
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    agg = Aggregator(plan)
    for i, seed in enumerate([agg.seed, agg.seed, 99, 99, 98]):
        agg.add(client_update(plan, model, seed=seed, nudge_seed=i)[0])
    assert calls["project_blocks"] == 5
    agg.apply_(copy.deepcopy(model))
    assert calls["reconstruct_blocks_"] == 1  # one for all 3 distinct seeds, not per seed, client or block


def test_rebuilt_update_is_unbiased():
    torch.manual_seed(2)
    model = torch.nn.Linear(8, 4)
    plan = FerretPlan.from_model(model, 20, backend=BACKEND)
    assert plan.block_sizes == (32, 4)
    end = copy.deepcopy(model)
    nudge(end, 0)
    delta = flat(model) - flat(end)
    samples = []
    for seed in range(300):
        c = copy.deepcopy(model)
        cr = ClientRound(plan, c, round=0, seed=seed).begin()
        with torch.no_grad():
            for p, q in zip(c.parameters(), end.parameters(), strict=True):
                p.copy_(q)
        update = cr.compress()
        out = torch.zeros(plan.numel)
        functional.reconstruct_blocks_(out, plan.block_sizes, update.counts, update.coefficients, seed,
                                       backend=BACKEND)
        samples.append(out.double())
    samples = torch.stack(samples)
    n = len(samples)
    # Each bound fails with probability ~1e-8 when the estimate is unbiased. Per element:
    mean, sem = samples.mean(0), samples.std(0) / n**0.5
    assert bool(((mean - delta).abs() <= 6 * sem).all()), (mean - delta).abs() / sem
    # and along delta, per block, which also catches a scale off by tens of percent
    for block in torch.split(torch.arange(plan.numel), list(plan.block_sizes)):
        d = delta[block]
        s = samples[:, block] @ d / d.dot(d)
        assert abs(float(s.mean()) - 1) <= 6 * float(s.std()) / n**0.5, float(s.mean())


def test_paper_scale_is_parity_factor_times_unbiased():
    model = tiny_model()
    unbiased = FerretPlan.from_model(model, 12, backend=BACKEND)
    paper = FerretPlan.from_model(model, 12, scale="paper", backend=BACKEND)
    a, _ = client_update(unbiased, model, seed=3, nudge_seed=0)
    b, _ = client_update(paper, model, seed=3, nudge_seed=0)
    assert a.counts == b.counts and b.scale == "paper"
    factors = torch.tensor([parity_factor(d) for d in paper.block_sizes])[coefficient_blocks(a.counts)]
    torch.testing.assert_close(b.coefficients.double(), a.coefficients.double() * factors, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="scale"):
        Aggregator(unbiased).add(b)


def test_client_round_restore_snapshot_and_errors():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    start = flat(model)
    kept = copy.deepcopy(model)
    cr = ClientRound(plan, kept, round=0, seed=4, restore=False, snapshot_device="cpu").begin()
    nudge(kept, 0)
    end = flat(kept)
    kept_update = cr.compress()
    assert torch.equal(flat(kept), end)
    with pytest.raises(RuntimeError, match="snapshot"):
        cr.compress()
    restored = copy.deepcopy(model)
    with plan.client_round(restored, round=0, seed=4) as cr:
        nudge(restored, 0)
    assert torch.equal(flat(restored), start)
    assert cr.update.counts == kept_update.counts
    assert torch.equal(cr.update.coefficients, kept_update.coefficients)
    with pytest.raises(KeyError):
        with plan.client_round(restored, round=0, seed=4) as cr:
            nudge(restored, 0)
            raise KeyError("training failed")
    assert cr.update is None and torch.equal(flat(restored), start), "an exception in `with` restores w_start"
    diverged = copy.deepcopy(model)
    cr = ClientRound(plan, diverged, round=0, seed=4).begin()
    with torch.no_grad():
        diverged[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="diverged"):
        cr.compress()
    assert torch.equal(flat(diverged), start), "a failed compress must still restore the starting weights"


def test_momentum_with_fixed_seed():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    with pytest.raises(ValueError, match="fixed"):
        Aggregator(plan, momentum=0.9)
    agg = Aggregator(plan, momentum=0.5, seed_schedule="fixed", base_seed=11)
    agg.add(client_update(plan, model, seed=11, nudge_seed=0, allocation="uniform")[0])
    first = agg.aggregate()
    u = client_update(plan, model, seed=11, nudge_seed=1, round=1)[0]
    with pytest.raises(ValueError, match="momentum"):
        agg.add(client_update(plan, model, seed=12, nudge_seed=1, round=1)[0])
    agg.add(u)
    second = agg.aggregate()
    assert second.seeds == (11,) and second.counts[0] == tuple(map(max, zip(first.counts[0], u.counts, strict=True)))
    expected = torch.zeros(sum(second.counts[0]), dtype=torch.float64)
    for counts, c, w in [(first.counts[0], first.coefficients[0], 0.5), (u.counts, u.coefficients, 1.0)]:
        out = start = 0
        for K, K_max in zip(counts, second.counts[0], strict=True):
            expected[out:out + K] += w * c[start:start + K].double()
            out, start = out + K_max, start + K
    torch.testing.assert_close(second.coefficients[0].double(), expected, rtol=1e-6, atol=1e-9)


def block_norms_of_update(plan, g: GlobalUpdate) -> list[float]:
    step = sum(dense_rebuild(plan, s, c, x) for s, c, x in zip(g.seeds, g.counts, g.coefficients, strict=True))
    return [float(b.norm()) for b in torch.split(step, list(plan.block_sizes))]


@pytest.mark.parametrize("mode", ["block", "block_exact", "piece"])
def test_clipping(mode):
    model = tiny_model(3, (40, 40, 8))
    plan = FerretPlan.from_model(model, 16, backend=BACKEND)
    unclipped = Aggregator(plan)
    clipped = Aggregator(plan, clip_norm=0.05, clip=mode)
    for i, seed in enumerate([unclipped.seed, unclipped.seed, 77]):
        u = client_update(plan, model, seed=seed, nudge_seed=i, step=0.01)[0]
        unclipped.add(u)
        clipped.add(u)
    before = block_norms_of_update(plan, unclipped.aggregate())
    g = clipped.aggregate()
    after = block_norms_of_update(plan, g)
    assert max(before) > 0.1, "the test needs blocks above the clip norm"
    if mode == "block_exact":
        assert max(after) <= 0.05 * (1 + 1e-5)
        assert all(a == pytest.approx(b, rel=1e-5) for a, b in zip(after, before, strict=True) if b < 0.05)
    elif mode == "block":
        assert max(after) <= 0.05 * 1.3
    else:
        rho = rng.VARIANCE[plan.distribution]
        for counts, c in zip(g.counts, g.coefficients, strict=True):
            d = torch.tensor(plan.block_sizes, dtype=torch.float64)[coefficient_blocks(counts)]
            assert bool((c.double().abs() * (rho * d).sqrt() <= 0.05 * (1 + 1e-6)).all())


def test_refusals_leave_the_model_untouched():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    agg = Aggregator(plan)
    good, _ = client_update(plan, model, seed=agg.seed, nudge_seed=0)
    bad_updates = {
        "round": ClientUpdate(1, good.seed, good.counts, good.coefficients, 1, good.fingerprint),
        "fingerprint": ClientUpdate(0, good.seed, good.counts, good.coefficients, 1, "0" * 64),
        "budget": ClientUpdate(0, good.seed, (good.counts[0] + 1,) + good.counts[1:],
                               torch.cat([good.coefficients, torch.zeros(1)]), 1, good.fingerprint),
        ">= 1": ClientUpdate(0, good.seed, (good.counts[0] + good.counts[1], 0) + good.counts[2:],
                             good.coefficients, 1, good.fingerprint),
        "blocks": ClientUpdate(0, good.seed, good.counts[:-1], good.coefficients[:-good.counts[-1]], 1,
                               good.fingerprint),
        "finite": ClientUpdate(0, good.seed, good.counts, good.coefficients.clone().index_fill_(0, torch.tensor([2]),
                                                                                             float("nan")),
                               1, good.fingerprint),
        "num_samples": ClientUpdate(0, good.seed, good.counts, good.coefficients, 0, good.fingerprint),
    }
    for field, update in bad_updates.items():
        with pytest.raises(ValueError, match=field):
            agg.add(update)
    assert len(agg) == 0
    agg.add(good)
    other = tiny_model(0, (6, 5, 4))
    before = flat(other)
    with pytest.raises(ValueError, match="shape"):
        agg.apply_(other)
    assert torch.equal(flat(other), before) and len(agg) == 1 and agg.round == 0, "nothing consumed"
    server = copy.deepcopy(model)
    g = agg.apply_(server)
    target = copy.deepcopy(model)
    before = flat(target)
    wrong_round = GlobalUpdate(5, g.seeds, g.counts, g.coefficients, g.server_lr, g.fingerprint, plan)
    with pytest.raises(ValueError, match="round"):
        wrong_round.apply_(target, round=0)
    nan = GlobalUpdate(0, g.seeds, g.counts, (g.coefficients[0].clone().fill_(float("inf")),), 1.0, g.fingerprint,
                       plan)
    with pytest.raises(ValueError, match="finite"):
        nan.apply_(target)
    other_plan = FerretPlan.from_model(model, 12, distribution="rademacher", backend=BACKEND)
    with pytest.raises(ValueError, match="fingerprint"):
        g.apply_(target, plan=other_plan)
    with pytest.raises(ValueError, match="backend"):
        g.apply_(target, backend="gpu")
    assert torch.equal(flat(target), before)
    g.apply_(target)
    assert torch.equal(flat(target), flat(server))


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def test_tiny_llama_round_replays_bitwise():
    from ferret_kernels import wire

    model = tiny_llama()
    plan = FerretPlan.from_model(model, 64, backend=BACKEND)
    assert plan.num_blocks > 10
    agg = Aggregator(plan, server_lr=2.0, base_seed=2025)
    start = [p.detach().clone() for p in model.parameters()]
    clients = []
    for i in range(2):
        client = copy.deepcopy(model)
        g = torch.Generator().manual_seed(100 + i)
        tokens = torch.randint(0, 64, (4, 12), generator=g)
        opt = torch.optim.SGD(client.parameters(), lr=0.5)
        with plan.client_round(client, round=0, seed=agg.seed, num_samples=4 + i) as cr:
            for _ in range(2):
                opt.zero_grad()
                client(input_ids=tokens, labels=tokens).loss.backward()
                opt.step()
            assert any(not torch.equal(p, s) for p, s in zip(client.parameters(), start, strict=True))
        assert all(torch.equal(p, s) for p, s in zip(client.parameters(), start, strict=True)), "restore must be exact"
        agg.add(wire.decode_client_update(wire.encode_client_update(cr.update), plan, round=0))
        clients.append(client)
    server = copy.deepcopy(model)
    payload = wire.encode_global_update(agg.apply_(server))
    assert any(not torch.equal(p, s) for p, s in zip(server.parameters(), start, strict=True))
    for client in clients:
        wire.decode_global_update(payload, plan, round=0).apply_(client)
        for (name, p), q in zip(client.named_parameters(), server.parameters(), strict=True):
            assert torch.equal(p, q), name


def test_trainer_callback_smoke(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ferret_kernels.hooks import FerretCallback

    model = tiny_llama(1)
    start = [p.detach().clone() for p in model.parameters()]
    plan = FerretPlan.from_model(model, 48, backend=BACKEND)
    g = torch.Generator().manual_seed(7)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (6, 10), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=0.1, report_to=[], save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, use_cpu=True)
    callback = FerretCallback(plan, round=0, seed=9)
    assert isinstance(callback, transformers.TrainerCallback)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    update = callback.update
    assert update is not None and update.num_samples == 6 and sum(update.counts) == 48
    assert float(update.coefficients.abs().sum()) > 0
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start, strict=True))
    agg = Aggregator(plan)
    agg.add(update)
    agg.apply_(model)
