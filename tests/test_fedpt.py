"""FedPT: the proxy's logits arithmetic, generation and black-box path, the tokenizer check,
and the round (distillation lowers the KL of what clients replay, bit for bit)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ferret_fl import config, simulation
from ferret_fl.algorithms import build_client, build_server, prepare_model
from ferret_fl.algorithms.base import trainable
from ferret_fl.algorithms.fedpt import kept_layers, truncate_layers
from ferret_fl.models import load_causal_lm, load_tokenizer
from ferret_fl.proxy import ProxyTunedLM, check_same_tokenizer, module_logits, positions
from ferret_kernels import wire
from tests.helpers import assert_bitwise

TINY = "llama-tiny-shape"


@pytest.fixture(scope="module")
def trio():
    """(large, tuned, base, tokenizer): three tiny LLaMAs with different random weights."""
    large, tok = load_causal_lm(TINY, seed=1)
    tuned, _ = load_causal_lm(TINY, seed=2)
    base, _ = load_causal_lm(TINY, seed=3)
    return large.eval(), tuned.eval(), base.eval(), tok


def prompts(tok, texts=("hello world", "a", "The quick brown fox")):
    return tok(list(texts), return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.25, 2.0])
@pytest.mark.parametrize("texts", [("hello world", "a"), ("x",), ("odd", "lengths here", "zz z")])
def test_logits_are_large_plus_alpha_offset(trio, alpha, texts):
    large, tuned, base, tok = trio
    enc = prompts(tok, texts)
    proxy = ProxyTunedLM(large, tuned, base, alpha=alpha, tokenizer=tok, large_tokenizer=tok)
    with torch.no_grad():
        got = proxy(**enc).logits
        direct = [m(**enc, position_ids=positions(enc["attention_mask"])).logits.double() for m in (large, tuned, base)]
    want = direct[0] + alpha * (direct[1] - direct[2])
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_the_large_model_and_greedy_matches_transformers(trio):
    large, tuned, base, tok = trio
    enc = prompts(tok)
    proxy = ProxyTunedLM(large, tuned, base, alpha=0.0)
    with torch.no_grad():
        assert_bitwise(proxy(**enc).logits, large(**enc, position_ids=positions(enc["attention_mask"])).logits)
    kw = dict(max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert torch.equal(proxy.generate(**enc, **kw), large.generate(**enc, do_sample=False, **kw))


def test_cached_greedy_decoding_picks_the_argmax_of_the_whole_prefix(trio):
    # the KV cache changes float rounding only: every generated token is the argmax of the
    # proxy's logits recomputed on the whole prefix, up to that rounding
    large, tuned, base, tok = trio
    enc = prompts(tok)
    proxy = ProxyTunedLM(large, tuned, base, alpha=1.0)
    out = proxy.generate(**enc, max_new_tokens=8)
    n = enc["input_ids"].shape[1]
    assert out.shape == (3, n + 8) and torch.equal(out[:, :n], enc["input_ids"])
    mask = torch.cat([enc["attention_mask"], torch.ones(3, 8, dtype=torch.int64)], 1)
    with torch.no_grad():
        logits = proxy(input_ids=out, attention_mask=mask).logits[:, n - 1:-1]
    chosen = logits.gather(-1, out[:, n:, None]).squeeze(-1)
    assert bool((chosen >= logits.amax(-1) - 1e-5).all())


def test_black_box_large_model_gives_the_same_logits_and_generations(trio):
    large, tuned, base, tok = trio
    enc = prompts(tok)
    module = ProxyTunedLM(large, tuned, base, alpha=0.7)
    black_box = ProxyTunedLM(module_logits(large), tuned, base, alpha=0.7)
    with torch.no_grad():
        torch.testing.assert_close(black_box(**enc).logits, module(**enc).logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(black_box.generate(**enc, max_new_tokens=6), module.generate(**enc, max_new_tokens=6))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a, b = black_box.generate(**enc, generator=g1, **kw), module.generate(**enc, generator=g2, **kw)
    assert torch.equal(a, b) and a.shape[1] > enc["input_ids"].shape[1]
    bad = ProxyTunedLM(lambda ids, mask: torch.zeros(ids.shape[0], 3), tuned, base)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        bad(**enc)


def test_sampling_respects_top_k(trio):
    large, tuned, base, tok = trio
    enc = prompts(tok, ("abc",))
    proxy = ProxyTunedLM(large, tuned, base)
    with torch.no_grad():
        allowed = set(proxy(**enc).logits[0, -1].topk(3).indices.tolist())
    for seed in range(6):
        out = proxy.generate(**enc, max_new_tokens=1, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert int(out[0, -1]) in allowed


def test_a_mismatched_tokenizer_is_refused_with_the_argument_and_the_fix(trio):
    large, tuned, base, tok = trio
    smol = load_tokenizer("smollm2-135m")
    with pytest.raises(ValueError, match="large_tokenizer differs.*one family"):
        ProxyTunedLM(large, tuned, base, tokenizer=tok, large_tokenizer=smol)
    swapped = copy.deepcopy(tok)
    swapped.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="large_tokenizer differs"):
        check_same_tokenizer(tok, swapped)
    cfg = config.RunConfig(algorithm="fedpt", model=TINY, large_model="smollm2-135m", data="synthetic").validate()
    with pytest.raises(ValueError, match=r"large_model \(--large-model\) differs"):
        build_server(cfg, prepare_model(cfg, load_causal_lm(TINY)[0]))
    with pytest.raises(ValueError, match="needs large_model"):
        config.RunConfig(algorithm="fedpt").validate()


def test_truncated_small_model_keeps_both_ends_and_decodes_with_its_cache():
    assert kept_layers(30, 6) == [0, 1, 2, 27, 28, 29] and kept_layers(5, 3) == [0, 1, 4]
    with pytest.raises(ValueError, match="fedpt_small_layers"):
        kept_layers(2, 2)
    model, tok = load_causal_lm(TINY, seed=4)
    model.config.num_hidden_layers = 3
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))
    small = truncate_layers(model, 2)
    assert len(small.model.layers) == 2 and small.model.layers[1].self_attn.layer_idx == 1
    assert small.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    enc = prompts(tok)
    proxy = ProxyTunedLM(small, small, small, alpha=0.0)
    kw = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert torch.equal(proxy.generate(**enc, **kw), small.generate(**enc, do_sample=False, **kw))


def fedpt_config(tmp_path, inner="ferret", **overrides):
    values = dict(algorithm="fedpt", fedpt_inner=inner, model=TINY, large_model=TINY, fedpt_small_layers=1,
                  data="synthetic", budget=64, lr=0.05, local_steps=2, grad_accum=1, batch_size=2, max_length=512,
                  clients_per_round=2, server_lr=1.0, fedpt_distill_steps=6, fedpt_distill_prompts=4,
                  fedpt_distill_tokens=6, eval_batch_size=4, fedpt_distill_lr=1e-3,
                  eval_samples=4, eval_loss_samples=4, max_new_tokens=4, rounds=1, output_dir=str(tmp_path))
    values.update(overrides)
    return config.RunConfig(**values).validate()


@pytest.mark.parametrize("inner", ["ferret", "fedavg"])
def test_a_round_distils_into_what_every_client_replays(tmp_path, inner):
    cfg = fedpt_config(tmp_path, inner)
    model = prepare_model(cfg, load_causal_lm(TINY, seed=cfg.seed)[0])
    assert len(model.model.layers) == 1
    server, client = build_server(cfg, model), build_client(cfg, model)
    node = copy.deepcopy(model)
    dataset = simulation.load_dataset(cfg)
    tok = server.tokenizer
    announcement = server.announce(1)
    uploads = []
    for c in (0, 1):
        items = simulation.tokenize_examples(dataset.clients[c].examples, tok, cfg.max_length)
        steps = simulation.client_steps(cfg, items, 1, c, tok.pad_token_id)
        uploads.append(client.train(model, steps, announcement, client_id=c, num_samples=len(items)).payload)
    downlink = server.aggregate(1, uploads)
    report = server.last_report
    assert report["kept"] and report["kl_after"] < report["kl_before"], report
    if inner == "ferret":
        update = wire.decode_global_update(downlink, client.plan, round=1)
        assert len(update.seeds) == 2 and sum(update.counts[1]) == cfg.budget
        assert len(downlink) < 4 * 2 * cfg.budget + 4096  # two K-coefficient groups and a header
    server.apply_(model, downlink, 1)
    client.apply_(node, downlink, 1)
    for a, b in zip(model.parameters(), node.parameters(), strict=True):
        assert_bitwise(a, b)
    assert server.round == 2
    views = server.evaluation_views(model, 1)
    assert set(views) == {"small_tuned", "proxy"}


def one_upload(cfg):
    """(model, server, client, client 0's round-1 upload) of a fresh FedPT run."""
    model = prepare_model(cfg, load_causal_lm(TINY, seed=cfg.seed)[0])
    server, client = build_server(cfg, model), build_client(cfg, model)
    dataset = simulation.load_dataset(cfg)
    items = simulation.tokenize_examples(dataset.clients[0].examples, server.tokenizer, cfg.max_length)
    steps = simulation.client_steps(cfg, items, 1, 0, server.tokenizer.pad_token_id)
    upload = client.train(model, steps, server.announce(1), client_id=0, num_samples=len(items)).payload
    return model, server, client, upload


def test_a_distillation_that_raises_the_kl_is_dropped(tmp_path):
    cfg = fedpt_config(tmp_path, fedpt_distill_lr=1e-2)  # overshoots on these weights
    model, server, client, upload = one_upload(cfg)
    downlink = server.aggregate(1, [upload])
    assert not server.last_report["kept"] and server.last_report["kl_after"] > server.last_report["kl_before"]
    assert len(wire.decode_global_update(downlink, client.plan, round=1).seeds) == 1
    server.apply_(model, downlink, 1)


def test_a_failed_distillation_leaves_the_server_at_its_round(tmp_path, monkeypatch):
    cfg = fedpt_config(tmp_path)
    model, server, client, upload = one_upload(cfg)
    monkeypatch.setattr(server, "_distill_ferret", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        server.aggregate(1, [upload])
    assert server.round == 1
    monkeypatch.undo()
    assert server.aggregate(1, [upload]) and server.round == 2 and model is server.model


def test_cli_run_records_the_proxy_views_and_the_distillation(tmp_path):
    from ferret_fl import cli, metrics

    out = tmp_path / "run"
    code = cli.main(["run", "--algorithm", "fedpt", "--model", TINY, "--large-model", TINY, "--fedpt-small-layers", "1",
                     "--data", "synthetic", "--budget", "64", "--lr", "0.05", "--local-steps", "1", "--grad-accum", "1",
                     "--max-length", "512", "--clients-per-round", "2", "--server-lr", "1", "--fedpt-distill-steps", "2",
                     "--fedpt-distill-prompts", "2", "--fedpt-distill-tokens", "4", "--fedpt-distill-lr", "0.001",
                     "--eval-samples", "2", "--eval-loss-samples", "2", "--max-new-tokens", "3", "--rounds", "1",
                     "--divergence-factor", "0", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    rows = metrics.read(str(out))
    assert set(rows[0]["views"]) == {"large_base"}
    assert {"small_tuned", "proxy"} <= set(rows[1]["views"]) and "rouge_l_paper" in rows[1]["views"]["proxy"]
    assert {"kl_before", "kl_after", "kept"} <= set(rows[1]["distillation"])
    assert (out / "eval" / "round-000001-proxy.json").is_file()
    json.dumps(rows)


@pytest.mark.parametrize("inner", ["ferret", "fedavg"])
def test_the_proxy_offset_is_the_federated_tuning_alone(tmp_path, inner):
    """Over rounds, kept distillation or not, the small model minus the anti-expert equals the sum
    of the federated steps (tuned_r - w_r): the anti-expert absorbs each distillation, so the
    large-minus-small gap the distillation moved into the small model is not counted again in the
    next round's proxy."""
    cfg = fedpt_config(tmp_path, inner, rounds=2)
    model = prepare_model(cfg, load_causal_lm(TINY, seed=cfg.seed)[0])
    server, client = build_server(cfg, model), build_client(cfg, model)
    dataset = simulation.load_dataset(cfg)
    tok = server.tokenizer
    federated = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in trainable(model)}
    for r in (1, 2):
        start = {n: p.detach().double().clone() for n, p in trainable(model)}
        uploads = []
        for c in (0, 1):
            node = copy.deepcopy(model)
            items = simulation.tokenize_examples(dataset.clients[c].examples, tok, cfg.max_length)
            steps = simulation.client_steps(cfg, items, r, c, tok.pad_token_id)
            uploads.append(client.train(node, steps, server.announce(r), client_id=c, num_samples=len(items)).payload)
        downlink = server.aggregate(r, uploads)
        kept = server.last_report["kept"]
        assert kept or r > 1, server.last_report
        tuned = dict(server.tuned.named_parameters())
        for n in federated:
            federated[n] += tuned[n].detach().double() - start[n]
        server.apply_(model, downlink, r)
        base, weights = dict(server.base.named_parameters()), dict(trainable(model))
        moved = max(float((weights[n] - tuned[n]).detach().abs().max()) for n in federated)
        assert moved > 1e-4 if kept else moved == 0  # a kept distillation did move the small model
        for n in federated:
            offset = weights[n].detach().double() - base[n].double()
            torch.testing.assert_close(offset, federated[n], atol=2e-6, rtol=0)

    state = server.state_dict()
    restored = build_server(cfg, prepare_model(cfg, load_causal_lm(TINY, seed=cfg.seed)[0]))
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    assert restored.round == 3
    for (n, a), (_, b) in zip(server.base.named_parameters(), restored.base.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    name = next(k for k in state if k.startswith("fedpt_base/"))
    fresh = build_server(cfg, prepare_model(cfg, load_causal_lm(TINY, seed=cfg.seed)[0]))
    before = [p.clone() for p in fresh.base.parameters()]
    for bad in ({k: v for k, v in state.items() if k != name}, {**state, name: state[name][..., :1]},
                {**state, name: torch.full_like(state[name], float("nan"))}):
        with pytest.raises(ValueError, match="fedpt server state"):
            fresh.load_state_dict(bad)
        assert fresh.round == 1 and all(torch.equal(a, b) for a, b in zip(before, fresh.base.parameters(), strict=True))
