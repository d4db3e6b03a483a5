"""Wire format: round trips in fp32 / fp16 / bf16, exact sizes, and every refusal
(format, version, fingerprint, round, truncation, corruption, non-finite values, counts)."""

import copy
import json
import time

import pytest
import torch

from ferret_kernels import rng, wire
from ferret_kernels.client import ClientUpdate
from ferret_kernels.plan import FerretPlan
from ferret_kernels.server import Aggregator

BACKEND = "torch"


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    agg = Aggregator(plan, base_seed=3)
    updates = []
    for i in range(2):
        c = copy.deepcopy(model)
        with plan.client_round(c, round=0, seed=agg.seed, num_samples=2 + i) as cr:
            with torch.no_grad():
                for p in c.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        updates.append(cr.update)
        agg.add(cr.update)
    return model, plan, updates[0], agg.aggregate()


def header_of(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_client_update_round_trip(setup, dtype):
    _, plan, update, _ = setup
    data = wire.encode_client_update(update, dtype=dtype)
    back = wire.decode_client_update(data, plan, round=0)
    assert (back.round, back.seed, back.counts, back.num_samples, back.fingerprint, back.scale) == (
        update.round, update.seed, update.counts, update.num_samples, update.fingerprint, update.scale)
    assert back.coefficients.dtype == torch.float32
    assert torch.equal(back.coefficients, update.coefficients.to(wire.DTYPES[dtype]).float())
    n, header = header_of(data)
    width = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    # 8-byte length, JSON header, then the raw tensors: int16 counts and the coefficients
    assert len(data) == 8 + n + 2 * plan.num_blocks + width * plan.budget
    assert header["coefficients"]["dtype"] == {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[dtype]


def test_global_update_round_trip_and_replay(setup):
    model, plan, _, g = setup
    back = wire.decode_global_update(wire.encode_global_update(g), plan, round=0)
    assert (back.round, back.seeds, back.counts, back.server_lr, back.fingerprint) == (
        g.round, g.seeds, g.counts, g.server_lr, g.fingerprint)
    assert all(torch.equal(a, b) for a, b in zip(back.coefficients, g.coefficients, strict=True))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    g.apply_(a)
    back.apply_(b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_lossy_downlink_needs_a_matching_aggregator(setup):
    model, plan, update, g = setup
    with pytest.raises(ValueError, match="wire_dtype"):
        wire.encode_global_update(g, dtype="fp16")
    agg = Aggregator(plan, base_seed=3, wire_dtype=torch.float16, server_lr=3.0)
    agg.add(update)
    server = copy.deepcopy(model)
    sent = agg.apply_(server)
    data = wire.encode_global_update(sent, dtype="fp16")
    assert len(data) < len(wire.encode_global_update(sent))
    client = copy.deepcopy(model)
    wire.decode_global_update(data, plan, round=0).apply_(client)
    assert all(torch.equal(p, q) for p, q in zip(client.parameters(), server.parameters(), strict=True))


def test_message_size_for_the_papers_budget():
    """K = 7800 over the 194 blocks of a 24-layer LLaMA (the paper's 1.3B-class shapes)."""
    hidden, inter, vocab = 2048, 5504, 32000
    shapes = [("embed", (vocab, hidden))]
    for i in range(24):
        shapes += [(f"l{i}.q", (hidden, hidden)), (f"l{i}.k", (hidden, hidden)), (f"l{i}.v", (hidden, hidden)),
                   (f"l{i}.o", (hidden, hidden)), (f"l{i}.gate", (inter, hidden)), (f"l{i}.up", (inter, hidden)),
                   (f"l{i}.down", (hidden, inter)), (f"l{i}.in_norm", (hidden,)), (f"l{i}.post_norm", (hidden,))]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    plan = FerretPlan.from_shapes([(n, s, torch.bfloat16) for n, s in shapes], 7800)
    assert plan.num_blocks == 194
    counts = plan.counts_for([float(i % 7 + 1) for i in range(194)])
    update = ClientUpdate(12, 2**64 - 1, tuple(counts), torch.randn(7800), 40, plan.fingerprint)
    sizes = {}
    for dtype, width in [("fp32", 4), ("fp16", 2)]:
        data = wire.encode_client_update(update, dtype=dtype)
        n, _ = header_of(data)
        assert len(data) == 8 + n + 2 * 194 + width * 7800
        assert n < 600
        sizes[dtype] = len(data)
        wire.decode_client_update(data, plan, round=12)
    print(f"ClientUpdate bytes for K=7800, L=194: {sizes}")


def decode_then_apply(data, plan, model, round=0):
    wire.decode_global_update(data, plan, round=round).apply_(model)


def test_refusals_name_the_field(setup):
    model, plan, update, g = setup
    client_bytes = wire.encode_client_update(update)
    global_bytes = wire.encode_global_update(g)
    other_plan = FerretPlan.from_model(model, 12, grouping="tensor")
    with pytest.raises(ValueError, match="fingerprint"):
        wire.decode_client_update(client_bytes, other_plan)
    with pytest.raises(ValueError, match="round 1 was expected"):
        wire.decode_client_update(client_bytes, plan, round=1)
    with pytest.raises(ValueError, match="decode_client_update"):
        wire.decode_global_update(client_bytes, plan)
    with pytest.raises(ValueError, match="decode_global_update"):
        wire.decode_client_update(global_bytes, plan)
    with pytest.raises(ValueError, match="truncated"):
        wire.decode_client_update(client_bytes[:5], plan)
    with pytest.raises(ValueError, match="budget"):
        wire.decode_client_update(client_bytes, FerretPlan.from_model(model, 13))
    with pytest.raises(ValueError, match="scale"):
        wire.decode_client_update(client_bytes, FerretPlan.from_model(model, 12, scale="paper"))
    with pytest.raises(TypeError):
        wire.decode_client_update("not bytes", plan)
    huge = ClientUpdate(0, 1, update.counts, update.coefficients * 1e6, 1, update.fingerprint)
    with pytest.raises(ValueError, match="float16"):
        wire.encode_client_update(huge, dtype="fp16")


def test_every_truncation_and_byte_flip_is_refused(setup):
    model, plan, update, g = setup
    before = [p.detach().clone() for p in model.parameters()]
    for data, decode in [(wire.encode_client_update(update), wire.decode_client_update),
                         (wire.encode_global_update(g), lambda d, p: decode_then_apply(d, p, model))]:
        for cut in range(0, len(data), 7):
            with pytest.raises(ValueError):
                decode(data[:cut], plan)
        with pytest.raises(ValueError, match="trailing"):
            decode(data + b"\0", plan)
        for i in range(len(data)):
            corrupted = bytearray(data)
            corrupted[i] ^= 0x01
            with pytest.raises(ValueError):
                decode(bytes(corrupted), plan)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def client_metadata(update, **changes):
    meta = {"format": wire.CLIENT_FORMAT, "version": wire.WIRE_VERSION, "contract": str(rng.CONTRACT_VERSION),
            "fingerprint": update.fingerprint, "round": "0", "seed": str(update.seed), "num_samples": "1",
            "scale": "unbiased"}
    meta.update(changes)
    return meta


def test_well_formed_but_invalid_messages(setup):
    """Messages with a valid digest (a buggy or hostile peer) are still checked field by field."""
    model, plan, update, g = setup
    counts = torch.tensor(update.counts, dtype=torch.int16)
    coef = update.coefficients
    cases = {
        "finite": (client_metadata(update), counts, coef.clone().index_fill_(0, torch.tensor([3]), float("nan"))),
        "budget": (client_metadata(update), counts + torch.tensor([1, 0, 0, 0], dtype=torch.int16),
                   torch.cat([coef, torch.zeros(1)])),
        ">= 1": (client_metadata(update), torch.tensor([9, 0, 2, 1], dtype=torch.int16), coef),
        "4 blocks": (client_metadata(update), counts[:3], coef[:sum(update.counts[:3])]),
        "counts add up": (client_metadata(update), counts, coef[:-1]),
        "int16/int32": (client_metadata(update), counts.float(), coef),
        "float32/float16/bfloat16": (client_metadata(update), counts, coef.double()),
        "version": (client_metadata(update, version="1"), counts, coef),
        "RNG contract": (client_metadata(update, contract="99"), counts, coef),
        "decimal": (client_metadata(update, round="-1"), counts, coef),
        "seed": (client_metadata(update, seed=str(2**64)), counts, coef),
        "num_samples": (client_metadata(update, num_samples="0"), counts, coef),
    }
    for field, (meta, c, x) in cases.items():
        data = wire._pack(meta, {"counts": c, "coefficients": x})
        with pytest.raises(ValueError, match=field):
            wire.decode_client_update(data, plan)
    extra = wire._pack(client_metadata(update), {"counts": counts, "coefficients": coef, "more": coef.clone()})
    with pytest.raises(ValueError, match="tensors"):
        wire.decode_client_update(extra, plan)
    good = wire._pack(client_metadata(update), {"counts": counts, "coefficients": coef})
    assert torch.equal(wire.decode_client_update(good, plan).coefficients, coef)

    global_meta = {"format": wire.GLOBAL_FORMAT, "version": wire.WIRE_VERSION, "contract": str(rng.CONTRACT_VERSION),
                   "fingerprint": g.fingerprint, "round": "0", "seeds": ",".join(map(str, g.seeds)),
                   "server_lr": "1.0", "start_digest": ""}
    gcounts = torch.tensor([list(c) for c in g.counts], dtype=torch.int16)
    gcoef = torch.cat(g.coefficients)
    bad_globals = {
        "server_lr": (dict(global_meta, server_lr="nan"), gcounts, gcoef),
        "shape": (global_meta, gcounts[:, :2], gcoef),
        "finite": (global_meta, gcounts, gcoef.clone().fill_(float("inf"))),
        "seeds": (dict(global_meta, seeds="1,x"), gcounts, gcoef),
        "more than any client": (global_meta, gcounts * 10, gcoef.repeat(10)),
    }
    before = [p.detach().clone() for p in model.parameters()]
    for field, (meta, c, x) in bad_globals.items():
        data = wire._pack(meta, {"counts": c, "coefficients": x})
        with pytest.raises(ValueError, match=field):
            decode_then_apply(data, plan, model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_issue_9_crashes_are_refusals(setup):
    """The inputs that used to escape as RuntimeError, OverflowError, RecursionError, or
    take a second to refuse, now raise MessageError at once."""
    _, plan, update, g = setup
    data = wire.encode_client_update(update)
    n, header = header_of(data)
    body = data[8 + n:]

    def with_header(h, body=body):
        text = json.dumps(h, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + body

    zero_d = json.loads(json.dumps(header))
    zero_d["coefficients"]["shape"] = []
    infinity = json.dumps(header).replace(str(header["counts"]["data_offsets"][1]), "Infinity", 1)
    deep = b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}"
    cases = [with_header(zero_d), len(infinity).to_bytes(8, "little") + infinity.encode() + body,
             len(deep).to_bytes(8, "little") + deep + body, wire.encode_client_update(update)[:-1] + b"\xff"]
    for bad in cases:
        for decode in (wire.decode_client_update, wire.decode_global_update):
            with pytest.raises(wire.MessageError):
                decode(bad, plan)
    counts = torch.ones(10**6, dtype=torch.int16)
    meta = client_metadata(update)
    big = wire._pack(meta, {"counts": counts, "coefficients": torch.zeros(10**6)})
    assert len(big) > 6_000_000
    t = time.perf_counter()
    with pytest.raises(wire.MessageError, match="blocks") as info:
        wire.decode_client_update(big, plan)
    assert time.perf_counter() - t < 0.05, "refused from the header, before hashing 6 MB"
    assert info.value.reason == "field"


def test_messages_are_safetensors_and_canonical(setup):
    from safetensors.torch import load

    _, plan, update, g = setup
    for data, decode in [(wire.encode_client_update(update, dtype="bf16"), wire.decode_client_update),
                         (wire.encode_global_update(g), wire.decode_global_update)]:
        tensors = load(data)
        assert set(tensors) == {"counts", "coefficients"}
        n, header = header_of(data)
        spaced = json.dumps(header).encode()
        spaced += b" " * (-len(spaced) % 8)
        with pytest.raises(wire.MessageError, match="canonical"):
            decode(len(spaced).to_bytes(8, "little") + spaced + data[8 + n:], plan)


def test_a_downlink_with_many_seeds_decodes_in_bounded_time(setup):
    _, plan, _, g = setup
    G = 20000
    meta = {"format": wire.GLOBAL_FORMAT, "version": wire.WIRE_VERSION, "contract": str(rng.CONTRACT_VERSION),
            "fingerprint": g.fingerprint, "round": "0", "seeds": ",".join(str(s) for s in range(G)),
            "server_lr": "1.0", "start_digest": ""}
    counts = torch.ones(G, plan.num_blocks, dtype=torch.int16)
    data = wire._pack(meta, {"counts": counts, "coefficients": torch.zeros(G * plan.num_blocks)})
    t = time.perf_counter()
    back = wire.decode_global_update(data, plan)
    assert len(back.seeds) == G and time.perf_counter() - t < 2.0
    counts[7, 2] = 0
    t = time.perf_counter()
    with pytest.raises(wire.MessageError, match=">= 1"):
        wire.decode_global_update(wire._pack(meta, {"counts": counts, "coefficients": torch.zeros(G * 4)}), plan)
    assert time.perf_counter() - t < 1.0
