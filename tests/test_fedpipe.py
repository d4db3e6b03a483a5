"""FedPipe's pieces, each against a direct computation: gradient-energy importance, the
adapter knapsack, the resource planner, quantised frozen bases, exact heterogeneous-rank
aggregation, the upload checks; then a round through the server and client roles."""

import copy
import itertools

import numpy as np
import pytest
import torch
from helpers import assert_bitwise

from ferret_fl import config, simulation
from ferret_fl.algorithms import build_client, build_server, prepare_model
from ferret_fl.algorithms.base import decode_tensors
from ferret_fl.data import collate, load_synthetic, tokenize_examples
from ferret_fl.fedpipe import adapters, importance, planner, quantize
from ferret_fl.models import load_causal_lm

pytest.importorskip("optimum.quanto")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (2, 4, 8)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_causal_lm("llama-tiny-shape", seed=3)
    items = simulation.usable_examples(tokenize_examples(load_synthetic().clients[0].examples, tok, 512))[:4]
    assert len(items) == 4
    return model, [collate(items[:2], tok.pad_token_id), collate(items[2:4], tok.pad_token_id)]


def _direct_energy(model, batches, layers, ranks):
    """E(r) from the weights' own autograd gradients (the definition, no hooks)."""
    model = copy.deepcopy(model)
    named = dict(model.named_modules())
    out = {name: np.zeros(len(ranks)) for name in layers}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for name in layers:
            s2 = torch.linalg.svdvals(named[name].weight.grad.double()).square().cumsum(0)
            out[name] += np.array([float(s2[min(r, len(s2)) - 1]) for r in ranks])
    return {n: v / len(batches) for n, v in out.items()}


def test_gradient_energy_equals_the_weight_gradients_singular_values(tiny):
    model, batches = tiny
    layers = importance.candidate_layers(model, TARGETS)
    assert len(layers) == 2 * len(TARGETS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = importance.gradient_energy(model, batches, layers, RANKS)
    want = _direct_energy(model, batches, layers, RANKS)
    for name in layers:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
        assert np.all(np.diff(got[name]) >= 0)  # more rank never loses energy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    order = sorted(layers, key=lambda n: -got[n][-1])
    assert order == sorted(layers, key=lambda n: -want[n][-1])


def test_a_layer_the_loss_cannot_reach_scores_zero_and_gets_no_adapter(tiny):
    model, batches = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()  # cuts layer 1's gate/up from the loss
    layers = importance.candidate_layers(model, TARGETS)
    energy = importance.gradient_energy(model, batches, layers, RANKS)
    dead = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert all(energy[n][-1] == 0 for n in dead)
    assert all(energy[n][-1] > 0 for n in layers if n not in dead)
    widths = {n: m.in_features + m.out_features for n, m in layers.items()}
    chosen = importance.select_adapters(energy, widths, RANKS, budget=10**9)
    assert not set(dead) & set(chosen)
    assert set(chosen) >= set(layers) - set(dead)


def test_candidate_layers_names_what_the_model_has_when_the_targets_miss():
    model, _ = load_causal_lm("llama-tiny-shape")
    with pytest.raises(ValueError, match="q_proj"):
        importance.candidate_layers(model, ["qkv"])


def _brute_force(energy, widths, ranks, budget):
    names, best = list(energy), 0.0
    for pick in itertools.product(range(len(ranks) + 1), repeat=len(names)):
        cost = sum(ranks[j - 1] * widths[n] for n, j in zip(names, pick, strict=True) if j)
        if cost <= budget:
            best = max(best, sum(energy[n][j - 1] for n, j in zip(names, pick, strict=True) if j))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_select_adapters_is_the_knapsack_optimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    ranks = sorted(rng.choice([1, 2, 3, 4, 8, 16], size=int(rng.integers(1, 4)), replace=False).tolist())
    widths = {f"l{i}": int(rng.choice([12, 18, 30, 48])) for i in range(n)}
    energy = {name: np.cumsum(rng.exponential(size=len(ranks)) * rng.choice([0.01, 1, 100])) for name in widths}
    budget = int(rng.integers(0, sum(widths.values()) * max(ranks)))
    chosen = importance.select_adapters(energy, widths, ranks, budget)
    cost = sum(r * widths[name] for name, r in chosen.items())
    value = sum(energy[name][ranks.index(r)] for name, r in chosen.items())
    assert cost <= budget and set(chosen.values()) <= set(ranks)
    assert value == pytest.approx(_brute_force(energy, widths, ranks, budget), rel=1e-12)


def test_select_adapters_refuses_bad_ranks_and_returns_nothing_under_the_smallest_cost():
    energy, widths = {"a": np.array([1.0, 2.0])}, {"a": 10}
    assert importance.select_adapters(energy, widths, [2, 4], budget=19) == {}
    assert importance.select_adapters(energy, widths, [2, 4], budget=40) == {"a": 4}
    with pytest.raises(ValueError, match="fedpipe_ranks"):
        importance.select_adapters(energy, widths, [4, 2], budget=40)


# ---- the planner ---------------------------------------------------------------------------------

MB = planner.MB
# A made-up model: 500 MB in its dtype, 200 MB at int8, 120 MB at int4; 1 MB of saved
# activations per token; 16 bytes per adapter parameter; at most 1e6 adapter parameters.
MEMORY = planner.MemoryModel(
    base_bytes={"none": 500 * MB, "int8": 200 * MB, "int4": 120 * MB},
    activations={p: planner.ActivationProfile(0.0, float(MB), 0.0) for p in ("none", "int8", "int4")},
    adapter_param_bytes=16, max_adapter_budget=10**6, min_adapter_cost=1000)


@pytest.mark.parametrize("memory_mb, precision, micro_batch, budget", [
    (2000, "none", 4, 10**6),  # everything fits
    (800, "none", 2, 10**6),  # accumulate before quantising
    (350, "int8", 1, 10**6),
    (240, "int4", 1, 10**6),
    (225, "int4", 1, (5 * MB) // 16),  # even int4 leaves less than the full budget
])
def test_a_client_quantises_only_as_far_as_its_memory_makes_it(memory_mb, precision, micro_batch, budget):
    setup = planner.plan_client(planner.Profile(memory_mb * MB, 1.0), MEMORY, precisions=("none", "int8", "int4"),
                                tokens=100, reference_examples=4)
    assert (setup.precision, setup.micro_batch, setup.adapter_budget) == (precision, micro_batch, budget)
    assert setup.micro_batch * setup.grad_accum == setup.examples_per_step == 4
    assert setup.predicted_bytes["total"] <= memory_mb * MB


def test_a_client_that_fits_nothing_is_told_what_it_needs():
    with pytest.raises(ValueError, match="needs 220 MB"):
        planner.plan_client(planner.Profile(150 * MB, 1.0), MEMORY, precisions=("none", "int8", "int4"), tokens=100,
                            reference_examples=4)
    with pytest.raises(ValueError, match="needs 600 MB.*allow int4"):
        planner.plan_client(planner.Profile(350 * MB, 1.0), MEMORY, precisions=("none",), tokens=100,
                            reference_examples=4)


def test_a_slower_client_takes_as_many_steps_of_fewer_examples():
    setups = [planner.plan_client(planner.Profile(4000 * MB, s), MEMORY, precisions=("none",), tokens=10,
                                  reference_examples=4) for s in (1.0, 0.5, 0.1)]
    assert [s.examples_per_step for s in setups] == [4, 2, 1]


def test_profiles_parse_and_bad_ones_are_named():
    profiles = planner.parse_profiles("2600:1, 900:0.25,512")
    assert profiles == [planner.Profile(2600 * MB, 1.0), planner.Profile(900 * MB, 0.25), planner.Profile(512 * MB, 1)]
    assert planner.profile_of(profiles, 4) == profiles[1]
    for bad in ("", "big:1", "100:-1", "0:1"):
        with pytest.raises(ValueError, match="fedpipe_profiles"):
            planner.parse_profiles(bad)


def test_the_memory_model_measures_the_model_it_is_built_for(tiny):
    model, _ = tiny
    layers = importance.candidate_layers(model, TARGETS)
    memory = planner.build_memory_model(model, layers, quantize.PRECISIONS, optimizer="adamw",
                                        max_adapter_budget=2000, min_rank=2)
    assert memory.base_bytes["none"] == quantize.tensor_bytes(model)
    assert memory.base_bytes["none"] > memory.base_bytes["int8"] > memory.base_bytes["int4"]
    assert memory.adapter_param_bytes == 16 and memory.min_adapter_cost == 2 * (32 + 16)  # k_proj: 32 -> 16
    for precision in quantize.PRECISIONS:
        twin = quantize.quantized_copy(model, precision, layers)
        for p in twin.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            measured = planner.peak_bytes(twin, 200)  # beyond the probe's lengths
        assert memory.activations[precision].bytes(200, 1) == pytest.approx(measured, rel=0.05), precision


# ---- quantised frozen bases ----------------------------------------------------------------------

@pytest.mark.parametrize("precision, tolerance", [("int8", 0.01), ("int4", 0.15)])
def test_a_quantised_layer_computes_within_tolerance_and_the_original_is_untouched(precision, tolerance):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
    before = model[0].weight.detach().clone()
    twin = quantize.quantized_copy(model, precision, ["0"])
    x = torch.randn(16, 256)
    with torch.no_grad():
        exact, approx = model(x), twin(x)
    relative = float((approx - exact).norm() / exact.norm())
    assert 0 < relative < tolerance
    assert torch.equal(model[0].weight, before) and type(model[0]) is torch.nn.Linear
    assert quantize.tensor_bytes(twin) < quantize.tensor_bytes(model) / (3 if precision == "int8" else 5)


def test_adapters_train_over_a_quantised_base_and_only_they_change(tiny):
    model, batches = tiny
    layers = importance.candidate_layers(model, TARGETS)
    twin = quantize.quantized_copy(model, "int4", layers)
    chosen = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 2}
    torch.manual_seed(0)
    peft_model = adapters.attach(twin, chosen, scaling=2.0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * (32 + 32) + 2 * (64 + 32)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for batch in batches:
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    factors = adapters.adapter_factors(peft_model, chosen)
    assert factors["model.layers.1.mlp.down_proj.lora_B"].shape == (32, 2)
    assert all(float(f.abs().sum()) > 0 for f in factors.values())
    checked = adapters.check_upload(factors, {n: (m.out_features, m.in_features) for n, m in layers.items()},
                                    RANKS, 10**6, "upload")
    assert set(checked) == set(chosen)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # the original is not the copy


# ---- heterogeneous-rank aggregation --------------------------------------------------------------

def _clients(shapes, rank_sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for ranks in rank_sets:
        out.append({n: (torch.randn(r, shapes[n][1], generator=g), torch.randn(shapes[n][0], r, generator=g) * 0.1)
                    for n, r in ranks.items()})
    return out


SHAPES = {"a": (24, 40), "b": (40, 24), "c": (16, 16)}
RANK_SETS = [{"a": 2, "b": 8}, {"a": 8}, {"a": 4, "b": 2, "c": 2}]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_stacked_merge_is_the_weighted_mean_of_the_dense_updates(dtype, atol):
    clients = _clients(SHAPES, RANK_SETS)
    weights, scaling, lr = [0.5, 0.3, 0.2], 2.0, 0.7
    stacked = adapters.stack(clients, weights, scaling, list(SHAPES))
    assert stacked["a.A"].shape == (14, 40) and stacked["c.B"].shape == (16, 2)
    adapters.check_stacked(stacked, SHAPES, "downlink")
    torch.manual_seed(1)
    layers = {n: torch.nn.Linear(i, o, bias=False, dtype=dtype) for n, (o, i) in SHAPES.items()}
    start = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    adapters.merge_(layers, stacked, lr)
    for name, layer in layers.items():
        dense = sum(w * scaling * (c[name][1].double() @ c[name][0].double())
                    for c, w in zip(clients, weights, strict=True) if name in c)  # a left-out layer is a zero update
        want = (start[name] + lr * dense).to(dtype)
        torch.testing.assert_close(layer.weight.detach(), want, atol=atol, rtol=0)


def test_averaging_the_factors_apart_would_not_be_the_mean_update():
    clients = _clients({"a": (24, 24)}, [{"a": 4}, {"a": 4}], seed=5)
    (a1, b1), (a2, b2) = clients[0]["a"], clients[1]["a"]
    mean_of_products = 0.5 * (b1 @ a1 + b2 @ a2)
    product_of_means = (0.5 * (b1 + b2)) @ (0.5 * (a1 + a2))
    stacked = adapters.stack(clients, [0.5, 0.5], 1.0, ["a"])
    torch.testing.assert_close(stacked["a.B"] @ stacked["a.A"], mean_of_products)
    assert float((product_of_means - mean_of_products).norm()) > 0.1 * float(mean_of_products.norm())


def test_a_layer_many_clients_adapted_travels_dense_and_merges_the_same_mean():
    shapes = {"a": (24, 40), "c": (16, 16)}
    rank_sets = [{"a": 8, "c": 2}] * 3 + [{"a": 8}] * 2  # a: R = 40 > 24 * 40 / 64; c: R = 6 < 8
    clients = _clients(shapes, rank_sets, seed=7)
    weights, scaling, lr = [0.1, 0.2, 0.3, 0.25, 0.15], 2.0, 0.7
    down = adapters.stack(clients, weights, scaling, list(shapes))
    assert set(down) == {"a.dense", "c.A", "c.B"} and down["a.dense"].shape == (24, 40)
    assert sum(t.numel() for t in down.values()) < sum(a.numel() + b.numel() for c in clients for a, b in c.values())
    adapters.check_stacked(down, shapes, "downlink")
    torch.manual_seed(3)
    layers = {n: torch.nn.Linear(i, o, bias=False) for n, (o, i) in shapes.items()}
    twins = copy.deepcopy(layers)
    start = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    adapters.merge_(layers, down, lr)
    adapters.merge_(twins, {k: v.clone() for k, v in down.items()}, lr)
    for name, layer in layers.items():
        dense = sum(w * scaling * (c[name][1].double() @ c[name][0].double())
                    for c, w in zip(clients, weights, strict=True) if name in c)
        torch.testing.assert_close(layer.weight.detach(), (start[name] + lr * dense).float(), atol=1e-6, rtol=0)
        assert_bitwise(layer.weight, twins[name].weight)
    for bad, message in (({**down, "a.dense": down["a.dense"][:, :-1]}, "dense update"),
                         ({**down, "a.dense": down["a.dense"].double()}, "not float32"),
                         ({**down, "a.dense": torch.full_like(down["a.dense"], float("inf"))}, "not finite"),
                         ({**down, "c.dense": torch.zeros(16, 16)}, "both stacked factors and a dense update")):
        with pytest.raises(ValueError, match=message):
            adapters.check_stacked(bad, shapes, "downlink")


def test_merge_is_bit_reproducible():
    stacked = adapters.stack(_clients(SHAPES, RANK_SETS), [0.2, 0.3, 0.5], 2.0, list(SHAPES))
    torch.manual_seed(2)
    layers = {n: torch.nn.Linear(i, o, bias=False) for n, (o, i) in SHAPES.items()}
    twins = copy.deepcopy(layers)
    adapters.merge_(layers, stacked, 1.0)
    adapters.merge_(twins, {k: v.clone() for k, v in stacked.items()}, 1.0)
    for name in layers:
        assert_bitwise(layers[name].weight, twins[name].weight)


# ---- what a server refuses -------------------------------------------------------------------------

def _upload(**replace):
    a, b = torch.randn(4, 40), torch.randn(24, 4)
    tensors = {"a.lora_A": a, "a.lora_B": b}
    tensors.update(replace)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("tensors, message", [
    (_upload(**{"z.lora_A": torch.zeros(4, 4)}), "not an adapter factor"),
    (_upload(**{"a.lora_B": None}), "lacks one of its two factors"),
    (_upload(**{"a.lora_A": torch.randn(3, 40), "a.lora_B": torch.randn(24, 3)}), "r in"),
    (_upload(**{"a.lora_A": torch.randn(4, 41)}), r"expected \(r, 40\)"),
    (_upload(**{"a.lora_A": torch.randn(4, 40, dtype=torch.float64)}), "float32"),
    (_upload(**{"a.lora_B": torch.full((24, 4), float("nan"))}), "not finite"),
    ({}, "holds no adapter"),
])
def test_a_malformed_upload_is_refused_with_the_reason(tensors, message):
    with pytest.raises(ValueError, match=message):
        adapters.check_upload(tensors, SHAPES, (2, 4, 8), 10**6, "upload")


def test_an_upload_over_the_adapter_budget_is_refused():
    with pytest.raises(ValueError, match="more than the 200"):
        adapters.check_upload(_upload(), SHAPES, (2, 4, 8), 200, "upload")


def test_a_downlink_with_foreign_or_mismatched_factors_is_refused():
    stacked = adapters.stack(_clients(SHAPES, RANK_SETS), [0.2, 0.3, 0.5], 2.0, list(SHAPES))
    with pytest.raises(ValueError, match="not stacked factors"):
        adapters.check_stacked({**stacked, "x.A": torch.zeros(1, 1)}, SHAPES, "downlink")
    with pytest.raises(ValueError, match="factors"):
        adapters.check_stacked({**stacked, "a.A": stacked["a.A"][:-1]}, SHAPES, "downlink")


# ---- a round through the roles -------------------------------------------------------------------

FEDPIPE = dict(model="llama-tiny-shape", data="synthetic", algorithm="fedpipe", optimizer="adamw", lr=1e-2,
               local_steps=2, batch_size=2, grad_accum=1, max_length=512, fedpipe_adapter_budget=0.05,
               fedpipe_profiles="64:1,4.5:0.5,4.5:1", fedpipe_ranks="2,4,8")


def test_one_round_plans_each_client_from_its_profile_and_every_peer_merges_the_same_bits():
    cfg = config.load(None, FEDPIPE)
    server_model = prepare_model(cfg, load_causal_lm(cfg.model, seed=cfg.seed)[0])
    node_model = copy.deepcopy(server_model)
    tok = load_causal_lm(cfg.model)[1]
    server, client = build_server(cfg, server_model), build_client(cfg, node_model)
    dataset = load_synthetic()
    uploads, setups = [], {}
    for c in (0, 1, 2):
        items = tokenize_examples(dataset.clients[c].examples, tok, cfg.max_length)
        steps = simulation.client_steps(cfg, items, 1, c, tok.pad_token_id, client)
        msg = client.train(node_model, steps, server.announce(1), client_id=c,
                           num_samples=len(simulation.usable_examples(items)))
        tensors, meta = decode_tensors(msg.payload, {"algorithm": "fedpipe"})
        setups[c] = meta
        assert int(meta["adapter_params"]) <= int(meta["setup_adapter_budget"])
        assert len(steps) == cfg.local_steps
        assert sum(len(mb["input_ids"]) for mb in steps[0]) == int(meta["setup_examples_per_step"])
        uploads.append(msg.payload)
    assert setups[0]["setup_examples_per_step"] == "2" and setups[1]["setup_examples_per_step"] == "1"
    assert (setups[0]["setup_micro_batch"], setups[0]["setup_grad_accum"]) == ("2", "1")
    assert (setups[2]["setup_micro_batch"], setups[2]["setup_grad_accum"]) == ("1", "2")  # less memory
    start = {k: v.clone() for k, v in server_model.state_dict().items()}
    downlink = server.aggregate(1, uploads)
    server.apply_(server_model, downlink, 1)
    client.apply_(node_model, downlink, 1)
    changed = [k for k, v in server_model.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and all("proj" in k for k in changed)
    for k, v in server_model.state_dict().items():
        assert_bitwise(v, node_model.state_dict()[k])
    with pytest.raises(ValueError, match="round"):
        client.apply_(node_model, downlink, 2)


def test_a_node_measures_the_memory_model_once_and_keeps_it_in_its_cache(tmp_path, monkeypatch):
    cfg = config.load(None, FEDPIPE)
    model = prepare_model(cfg, load_causal_lm(cfg.model, seed=cfg.seed)[0])
    first = build_client(cfg, model)
    first.use_cache(str(tmp_path))
    measured = first.memory_model()
    saved = tmp_path / "fedpipe-memory.json"
    assert saved.is_file()

    measure = planner.build_memory_model
    monkeypatch.setattr(planner, "build_memory_model", lambda *a, **k: pytest.fail("measured again"))
    again = build_client(cfg, copy.deepcopy(model))  # a fresh process's role, other weights alike
    again.use_cache(str(tmp_path))
    assert again.memory_model() == measured

    # Measured for other settings, or unreadable: measured again (and the file rewritten).
    monkeypatch.setattr(planner, "build_memory_model", lambda *a, **k: calls.append(1) or measure(*a, **k))
    for other_cfg, text in ((config.load(None, {**FEDPIPE, "optimizer": "sgd"}), None), (cfg, "{not json")):
        calls = []
        if text is not None:
            saved.write_text(text)
        other = build_client(other_cfg, model)
        other.use_cache(str(tmp_path))
        other.memory_model()
        assert calls == [1]
    assert planner.memory_model_from_json(saved.read_text(), "another key") is None


def test_fedpipe_settings_are_checked_when_the_config_loads():
    with pytest.raises(ValueError, match="fedpipe_ranks"):
        config.load(None, {**FEDPIPE, "fedpipe_ranks": "8,4"})
    with pytest.raises(ValueError, match="fedpipe_precisions"):
        config.load(None, {**FEDPIPE, "fedpipe_precisions": "int3"})
    with pytest.raises(ValueError, match="fedpipe_adapter_budget"):
        config.load(None, {**FEDPIPE, "fedpipe_adapter_budget": 1.5})
    cfg = config.load(None, {**FEDPIPE, "fedpipe_adapter_budget": 1e-5})
    with pytest.raises(ValueError, match="fedpipe_adapter_budget"):
        build_server(cfg, load_causal_lm(cfg.model)[0])
