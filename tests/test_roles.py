"""Server and client roles driven as separate peers: a client built from the run config and
its own model copy, the server holding its own; bytes are all that pass between them."""

import copy

import pytest
import torch

import ferret_kernels as fk
from ferret_fl import config, simulation
from ferret_fl.algorithms import Announcement, build_client, build_server, prepare_model
from ferret_fl.algorithms.base import decode_upload
from ferret_fl.data import load_synthetic, tokenize_examples
from ferret_fl.models import load_causal_lm

TINY = dict(model="llama-tiny-shape", data="synthetic", clients_per_round=2, local_steps=2, batch_size=2,
            grad_accum=1, max_length=512, lr=1e-2, server_lr=1.0, budget=96, kseed_candidates=32, kseed_lr=1e-3)


def _cfg(**overrides):
    return config.load(None, {**TINY, **overrides})


@pytest.fixture(scope="module")
def data():
    _, tok = load_causal_lm("llama-tiny-shape")
    clients = load_synthetic().clients
    return tok, [tokenize_examples(clients[c].examples, tok, TINY["max_length"]) for c in (0, 1, 2)]


def _peer(cfg):
    """A model as a fresh process would build it: loaded from the config, then prepared."""
    model, _ = load_causal_lm(cfg.model, seed=cfg.seed)
    return prepare_model(cfg, model)


def _round(cfg, server, server_model, node_models, data, r, clients=(0, 1)):
    tok, items = data
    announcement = Announcement.from_config(server.announce(r).as_config())
    uploads = []
    for c in clients:
        node = build_client(cfg, node_models[c])
        steps = simulation.client_steps(cfg, items[c], r, c, tok.pad_token_id, node)
        msg = node.train(node_models[c], steps, announcement, client_id=c,
                         num_samples=len(simulation.usable_examples(items[c])))
        assert isinstance(msg.payload, bytes)
        uploads.append(msg.payload)
    downlink = server.aggregate(r, uploads)
    server.apply_(server_model, downlink, r)
    for model in node_models.values():
        build_client(cfg, model).apply_(model, downlink, r)
    return downlink


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


SETUPS = {
    "ferret": {},
    "ferret-fixed-momentum-clip": dict(seed_schedule="fixed", server_momentum=0.5, clip_norm=0.05),
    "ferret-bf16": dict(coefficient_dtype="bf16", server_lr_decay=0.5),
    "fedavg": dict(algorithm="fedavg", fedavg_server_lr=0.7),
    "fedkseed": dict(algorithm="fedkseed"),
    "fedit": dict(algorithm="fedit", optimizer="adamw", lr=1e-3),
    "fedpipe": dict(algorithm="fedpipe", optimizer="adamw", lr=1e-3, fedpipe_adapter_budget=0.05,
                    fedpipe_profiles="64:1,8:0.5"),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_server_and_separate_nodes_reach_the_same_bits(data, setup):
    """Every node (its own model, its own client role per message) replays each downlink to
    the server's weights bit for bit; a node that missed round 1 catches up by replaying it."""
    cfg = _cfg(**SETUPS[setup])
    server_model = _peer(cfg)
    nodes = {c: _peer(cfg) for c in (0, 1, 2)}
    assert all(_same(server_model, m) for m in nodes.values())  # FedIT's LoRA init is seeded
    server = build_server(cfg, server_model)
    start = copy.deepcopy(server_model)
    late = nodes.pop(2)
    first = _round(cfg, server, server_model, nodes, data, 1)
    assert not _same(server_model, start)
    nodes[2] = late
    build_client(cfg, late).apply_(late, first, 1)
    _round(cfg, server, server_model, nodes, data, 2, clients=(1, 2))
    assert all(_same(server_model, m) for m in nodes.values())


def test_server_state_is_tensors_and_restores_the_next_round(data):
    """A server rebuilt from state_dict (what a checkpoint holds) produces the same downlink."""
    cfg = _cfg(seed_schedule="fixed", server_momentum=0.9)
    model = _peer(cfg)
    server = build_server(cfg, model)
    _round(cfg, server, model, {0: copy.deepcopy(model), 1: copy.deepcopy(model)}, data, 1)
    state = server.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert int(state["round"]) == 2 and "momentum" in state
    restored = build_server(cfg, model)
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    assert restored.round == 2 and restored.announce(2) == server.announce(2)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    down_a = _round(cfg, server, a, {0: copy.deepcopy(model), 1: copy.deepcopy(model)}, data, 2)
    down_b = _round(cfg, restored, b, {0: copy.deepcopy(model), 1: copy.deepcopy(model)}, data, 2)
    # (compared decoded: until the library's canonical encoding lands, safetensors orders
    # the header's metadata by hash, so equal content need not give equal bytes)
    ua, ub = (fk.decode_global_update(d, server.plan, round=2) for d in (down_a, down_b))
    assert (ua.seeds, ua.counts, ua.server_lr) == (ub.seeds, ub.counts, ub.server_lr)
    assert all(torch.equal(x, y) for x, y in zip(ua.coefficients, ub.coefficients, strict=True))
    assert _same(a, b)


@pytest.mark.parametrize("algorithm", ["ferret", "fedavg", "fedkseed"])
def test_server_state_refuses_a_bad_dict(algorithm):
    cfg = _cfg(algorithm=algorithm)
    server = build_server(cfg, _peer(cfg))
    with pytest.raises(ValueError):
        server.load_state_dict({"round": torch.tensor(1.5)})
    with pytest.raises(ValueError):
        server.load_state_dict({**server.state_dict(), "surprise": torch.zeros(1)})
    assert server.round == 1


def test_announcement_round_trips_and_refuses_bad_values():
    a = Announcement(3, 2**64 - 1, 1e-4)
    assert Announcement.from_config(a.as_config()) == a
    for bad in (dict(round=-1, seed=0, lr=1.0), dict(round=1, seed=2**64, lr=1.0), dict(round=1, seed=0, lr=0.0),
                dict(round=1, seed=0, lr=float("nan"))):
        with pytest.raises(ValueError):
            Announcement(**bad)
    with pytest.raises(ValueError, match="lacks"):
        Announcement.from_config({"round": 1})


def test_ferret_announces_the_seed_schedule():
    cfg = _cfg(seed_schedule="fixed")
    fixed = build_server(cfg, _peer(cfg))
    per_round = build_server(_cfg(), _peer(cfg))
    assert fixed.announce(1).seed == cfg.seed
    assert per_round.announce(1).seed not in (cfg.seed, fixed.announce(1).seed)


def test_server_runs_rounds_in_order_and_a_refused_round_can_be_retried(data):
    cfg = _cfg()
    model = _peer(cfg)
    server = build_server(cfg, model)
    with pytest.raises(ValueError, match="round 2 requested"):
        server.announce(2)
    with pytest.raises(ValueError):
        server.aggregate(1, [b"not a message"])
    assert server.round == 1
    _round(cfg, server, model, {0: copy.deepcopy(model), 1: copy.deepcopy(model)}, data, 1)
    assert server.round == 2


def test_ferret_server_refuses_a_downlink_that_differs_from_its_aggregate(data):
    cfg = _cfg()
    model = _peer(cfg)
    server = build_server(cfg, model)
    tok, items = data
    node = build_client(cfg, model)
    msg = node.train(model, simulation.client_steps(cfg, items[0], 1, 0, tok.pad_token_id), server.announce(1),
                     client_id=0, num_samples=5)
    downlink = server.aggregate(1, [msg.payload])
    update = fk.decode_global_update(downlink, server.plan, round=1)
    tampered = fk.GlobalUpdate(update.round, update.seeds, update.counts, (update.coefficients[0] * 2,),
                               update.server_lr, update.fingerprint, update.plan)
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="differs from what the server aggregated"):
        server.apply_(model, fk.encode_global_update(tampered), 1)
    assert _same(model, before)


def test_fedavg_weights_clients_by_their_examples_and_applies_its_server_lr(data):
    cfg = _cfg(algorithm="fedavg", fedavg_server_lr=0.5)
    model = _peer(cfg)
    tok, items = data
    server, node = build_server(cfg, model), build_client(cfg, model)
    msgs = [node.train(model, simulation.client_steps(cfg, items[c], 1, c, tok.pad_token_id), server.announce(1),
                       client_id=c, num_samples=n) for c, n in ((0, 1), (1, 3))]
    deltas = [decode_upload(m.payload, "fedavg", 1) for m in msgs]
    assert [n for _, n in deltas] == [1, 3]
    before = copy.deepcopy(model)
    server.apply_(model, server.aggregate(1, [m.payload for m in msgs]), 1)
    for name, p in model.named_parameters():
        expected = dict(before.named_parameters())[name] - 0.5 * (0.25 * deltas[0][0][name] + 0.75 * deltas[1][0][name])
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_max_grad_norm_bounds_each_local_step(data):
    tok, items = data
    sizes = {}
    for clip in (None, 1e-3):
        cfg = _cfg(algorithm="fedavg", max_grad_norm=clip, local_steps=3)
        model = _peer(cfg)
        msg = build_client(cfg, model).train(model, simulation.client_steps(cfg, items[0], 1, 0, tok.pad_token_id),
                                             Announcement(1, 0, cfg.lr), client_id=0, num_samples=1)
        delta, _ = decode_upload(msg.payload, "fedavg", 1)
        sizes[clip] = float(torch.sqrt(sum(t.double().square().sum() for t in delta.values())))
    assert sizes[1e-3] <= 3 * 1e-2 * 1e-3 * (1 + 1e-5)  # steps x lr x max_grad_norm
    assert sizes[None] > 10 * sizes[1e-3]
