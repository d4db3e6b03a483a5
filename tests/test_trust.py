"""The trust boundary: the basis bound, bounded influence, finite results, sample caps,
duplicates, replay guard, buffers, order independence, robust merging, DP, checkpoints."""

import copy
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_client_server import client_update, dense_rebuild, flat, nudge, tiny_model

import ferret_kernels as fk
from ferret_kernels import messages, rng, wire
from ferret_kernels.messages import BASIS_BOUND, ClientUpdate, GlobalUpdate, MessageError
from ferret_kernels.plan import FerretPlan
from ferret_kernels.server import Aggregator

BACKEND = "torch"


@pytest.fixture(scope="module")
def round0():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    seed = Aggregator(plan).seed
    updates = [client_update(plan, model, seed=seed, nudge_seed=i, num_samples=3 + i)[0] for i in range(4)]
    return model, plan, updates


def forged(update, **changes):
    fields = dict(round=update.round, seed=update.seed, counts=update.counts, coefficients=update.coefficients,
                  num_samples=update.num_samples, fingerprint=update.fingerprint, scale=update.scale)
    fields.update(changes)
    return ClientUpdate(**fields)


def test_basis_bound_is_the_contracts_largest_element():
    """Every gaussian element is r * cos or r * sin with r = sqrt(-2 log u) over the 2**23
    uniforms of the contract: the largest r is BASIS_BOUND, and |cos|, |sin| <= 1."""
    words = torch.arange(2**23, dtype=torch.int64) << 9
    r = rng.correctly_rounded_sqrt(rng.log_unit(rng.unit_uniform(words)) * -2.0)
    assert float(r.max()) == BASIS_BOUND["gaussian"]
    assert abs(BASIS_BOUND["gaussian"] - math.sqrt(48 * math.log(2))) < 1e-6
    cos, sin = rng.cos_sin_turn(words)
    assert float(cos.abs().max()) <= 1.0 and float(sin.abs().max()) <= 1.0
    v = fk.basis(3, 64, 4096, backend=BACKEND)
    assert float(v.abs().max()) <= BASIS_BOUND["gaussian"]
    assert set(fk.basis(3, 8, 512, distribution="rademacher", backend=BACKEND).abs().unique().tolist()) == {1.0}


class Vector(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_step_bound_holds_and_is_reachable():
    """|rebuilt_j| <= server_lr * B * sum|gamma| for any gamma; an adversary choosing
    gamma_k = c * sign(v_k[j]) reaches E|v| / B (about 0.14) of it on the weight it targets."""
    plan = FerretPlan.from_shapes([("w", (512,), torch.float32)], 32, grouping="tensor", backend=BACKEND)
    v = fk.basis(5, 32, 512, backend=BACKEND).double()
    target = 17
    for gamma in [torch.randn(32, dtype=torch.float64), -v[:, target].sign()]:
        g = GlobalUpdate(0, (5,), ((32,),), (gamma.float(),), 2.0, plan.fingerprint, plan)
        bound = float(g.step_bounds()[0])
        model = Vector(512)
        g.apply_(model)
        w = model.w.detach()
        assert float(w.abs().max()) <= bound
    assert float(w.abs().argmax()) == target
    assert float(w[target].abs()) / bound > 0.1


def test_hostile_coefficients_are_refused_and_the_round_goes_on(round0):
    model, plan, updates = round0
    agg = Aggregator(plan, server_lr=1.0)
    clean = Aggregator(plan, server_lr=1.0)
    agg.add(updates[0], client_id="a")
    clean.add(updates[0])
    for value in (3e38, 1e12):
        big = updates[1].coefficients.clone()
        big[0] = value
        with pytest.raises(MessageError, match="max_step") as info:
            agg.add(forged(updates[1], coefficients=big), client_id=f"hostile-{value}")
        assert info.value.reason == "influence"
    agg.add(updates[2], client_id="b")
    clean.add(updates[2])
    assert [r["reason"] for r in agg.refusals] == ["influence", "influence"]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    agg.apply_(a)
    clean.apply_(b)
    assert torch.equal(flat(a), flat(b)) and agg.last_report["refused"] == 2


def test_bounded_influence_can_be_widened_or_switched_off(round0):
    _, plan, updates = round0
    big = updates[1].coefficients * 1e6
    Aggregator(plan, max_step=None).add(forged(updates[1], coefficients=big))
    with pytest.raises(MessageError, match="max_step"):
        Aggregator(plan).add(forged(updates[1], coefficients=big))
    u = updates[0]
    influence = BASIS_BOUND["gaussian"] * float(u.block_l1(plan).max())
    agg = Aggregator(plan, server_lr=1.0, max_step=1.5 * influence)
    agg.add(u)
    with pytest.raises(ValueError, match="no updates"):
        agg.aggregate(server_lr=2.0)  # the same update moves weights twice as far: refused now
    assert len(agg) == 1, "a failed aggregate consumes nothing"


def test_hostile_downlink_is_refused_before_any_write(round0):
    model, plan, updates = round0
    agg = Aggregator(plan)
    agg.add(updates[0])
    g = agg.aggregate()
    target = copy.deepcopy(model)
    before = flat(target)
    per_unit_lr = float(g.step_bounds().max()) / g.server_lr
    big = tuple(c * (10 / per_unit_lr) for c in g.coefficients)  # any weight may move by 10 x server_lr
    for server_lr, reason in [(1e308, "field"), (3e38, "overflow"), (1e38, "overflow")]:
        hostile = GlobalUpdate(0, g.seeds, g.counts, big, server_lr, g.fingerprint, plan)
        with pytest.raises(MessageError, match="float32|finite value") as info:
            hostile.apply_(target)
        assert info.value.reason == reason
        data = wire.encode_global_update(hostile)
        with pytest.raises(MessageError):
            wire.decode_global_update(data, plan).apply_(target)
    with pytest.raises(MessageError, match="max_step"):
        g.apply_(target, max_step=1e-12)
    assert torch.equal(flat(target), before)
    half = copy.deepcopy(model).half()
    p16 = FerretPlan.from_model(half, 12, backend=BACKEND)
    g16 = GlobalUpdate(0, g.seeds, g.counts, g.coefficients, 1e7, p16.fingerprint, p16)  # finite in float32
    with pytest.raises(MessageError, match="overflow|finite"):
        g16.apply_(half)


def test_declared_sample_counts_are_capped(round0):
    model, plan, updates = round0
    agg = Aggregator(plan, weighting="samples")
    for u in updates[:3]:
        agg.add(u)
    agg.add(forged(updates[3], num_samples=2**62))
    g = agg.aggregate()
    median = statistics.median([3, 4, 5, 2**62])
    cap = 10 * median
    assert agg.last_report["sample_capped"] == 1
    weights = np.array([3, 4, 5, cap], dtype=np.float64)
    weights /= weights.sum()
    expected = sum(w * dense_rebuild(plan, g.seeds[0], u.counts, u.coefficients)
                   for w, u in zip(weights, updates, strict=True))
    got = dense_rebuild(plan, g.seeds[0], g.counts[0], g.coefficients[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    absolute = Aggregator(plan, max_samples=4, sample_cap=None)
    absolute.add(updates[0])
    absolute.add(forged(updates[1], num_samples=1000))
    absolute.aggregate()
    assert absolute.last_report["sample_capped"] == 1


def test_each_client_and_each_update_counts_once(round0):
    _, plan, updates = round0
    agg = Aggregator(plan)
    agg.add(updates[0], client_id=7)
    with pytest.raises(MessageError, match="once") as info:
        agg.add(updates[1], client_id=7)
    assert info.value.reason == "duplicate"
    with pytest.raises(MessageError, match="once"):
        agg.add(forged(updates[0]), client_id=8)
    data = wire.encode_client_update(updates[0])
    with pytest.raises(MessageError, match="once"):
        agg.add(wire.decode_client_update(data, plan, round=0))
    agg.add(updates[1], client_id=8)
    assert len(agg) == 2 and len(agg.refusals) == 3
    agg.aggregate()
    agg2 = Aggregator(plan, round=1)
    agg2.add(forged(updates[0], round=1), client_id=7)  # a new round counts the client again


def test_replay_guard_refuses_double_apply_wrong_round_and_wrong_model(round0):
    model, plan, updates = round0
    agg = Aggregator(plan)
    agg.add(updates[0])
    server = copy.deepcopy(model)
    g = agg.apply_(server)
    assert g.start_digest == plan.digest(model)
    down = wire.encode_global_update(g)
    client = copy.deepcopy(model)
    wire.decode_global_update(down, plan, round=0).apply_(client)
    assert torch.equal(flat(client), flat(server))
    after = flat(client)
    with pytest.raises(MessageError, match="already applied") as info:
        wire.decode_global_update(down, plan, round=0).apply_(client)
    assert info.value.reason == "start_digest"
    assert torch.equal(flat(client), after)
    other = tiny_model(seed=5)
    with pytest.raises(MessageError, match="start_digest|already applied"):
        g.apply_(other)
    agg.add(forged(updates[1], round=1, seed=agg.seed))
    g1 = agg.apply_(server)
    fresh = copy.deepcopy(model)
    with pytest.raises(MessageError):
        g1.apply_(fresh)  # round 1's update onto round 0's weights
    g.apply_(fresh)
    g1.apply_(fresh)
    assert torch.equal(flat(fresh), flat(server))
    unguarded = Aggregator(plan)
    unguarded.add(updates[0])
    assert unguarded.aggregate().start_digest is None


def test_digest_is_device_and_copy_independent_and_cheap():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12)
    d = plan.digest(model)
    assert d.startswith("xxh3_128:") and len(d) == 9 + 32
    assert plan.digest(copy.deepcopy(model)) == d
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight.view(-1)[3] = torch.nextafter(changed[0].weight.view(-1)[3], torch.tensor(1.0))
    assert plan.digest(changed) != d
    big = torch.zeros(2**24)
    t = time.perf_counter()
    fk.digest.tensors_digest([big])
    assert time.perf_counter() - t < 1.0, "64 MB should hash in well under a second"


def test_client_round_restores_weights_when_training_raises():
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)
    start = flat(model)
    with pytest.raises(RuntimeError, match="boom"):
        with plan.client_round(model, round=0, seed=1) as cr:
            nudge(model, 0)
            raise RuntimeError("boom")
    assert cr.update is None and torch.equal(flat(model), start)


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.bn(self.lin(x)))


def test_float_buffers_are_refused_included_or_frozen():
    model = BatchNormNet()
    with pytest.raises(ValueError, match="buffers='include'"):
        FerretPlan.from_model(model, 16)
    bare = FerretPlan.from_model(tiny_model(), 12)
    with pytest.raises(ValueError, match="buffers"):
        FerretPlan.from_model(model, 16, buffers="frozen").parameters(BatchNormNet()) and bare.parameters(model)

    frozen = FerretPlan.from_model(model, 16, buffers="frozen", backend=BACKEND)
    model.train()
    with pytest.raises(ValueError, match="changed during local training"):
        with frozen.client_round(model, round=0, seed=1):
            model(torch.randn(8, 4)).sum().backward()
    model.eval()
    with frozen.client_round(model, round=0, seed=1):
        model(torch.randn(8, 4))

    included = FerretPlan.from_model(model, 24, buffers="include", backend=BACKEND)
    assert included.buffer_names == ("bn.running_mean", "bn.running_var")
    assert included.fingerprint != frozen.fingerprint
    agg = Aggregator(included)
    server, client = copy.deepcopy(model), copy.deepcopy(model)
    trained = copy.deepcopy(model).train()
    with included.client_round(trained, round=0, seed=agg.seed) as cr:
        trained(torch.randn(16, 4))  # moves the running statistics only
    assert float(cr.update.coefficients.abs().sum()) > 0, "the buffers' change travels"
    agg.add(cr.update)
    wire.decode_global_update(wire.encode_global_update(agg.apply_(server)), included).apply_(client)
    assert torch.equal(server.bn.running_mean, client.bn.running_mean)
    assert not torch.equal(server.bn.running_mean, model.bn.running_mean)


def test_buffer_free_fingerprints_do_not_change():
    """The fingerprint of a plan without buffers is sha256 of the same payload as before
    buffers existed (so saved checkpoints and peers on older versions still match)."""
    import hashlib

    model = tiny_model()
    plan = FerretPlan.from_model(model, 12)
    payload = {"format": "ferret-plan/1", "contract": rng.CONTRACT_VERSION, "names": list(plan.names),
               "shapes": [list(s) for s in plan.shapes], "dtypes": ["float32"] * 4, "grouping": "paper",
               "block_sizes": list(plan.block_sizes), "distribution": "gaussian"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert plan.fingerprint == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("aggregation", ["mean", "median", "trimmed_mean"])
def test_merge_does_not_depend_on_the_order_of_add(round0, aggregation):
    model, plan, updates = round0
    extra = client_update(plan, model, seed=Aggregator(plan).seed, nudge_seed=9, allocation="uniform")[0]
    pool = updates + [extra]
    own_seed = [client_update(plan, model, seed=91, nudge_seed=5)[0]] if aggregation == "mean" else []
    results = set()
    for perm in [range(5), [4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 4, 0, 3, 2]]:
        agg = Aggregator(plan, aggregation=aggregation, trim_fraction=0.2)
        for i in perm:
            agg.add(pool[i])
        for u in own_seed:
            agg.add(u)
        g = agg.aggregate()
        results.add(tuple(torch.cat(g.coefficients).view(torch.int32).tolist()))
    assert len(results) == 1


def test_robust_merges_match_numpy(round0):
    _, plan, updates = round0
    rows = np.stack([u.coefficients.double().numpy() for u in updates])
    same_counts = all(u.counts == updates[0].counts for u in updates)
    if not same_counts:
        counts = tuple(max(c) for c in zip(*(u.counts for u in updates), strict=True))
        rows = np.zeros((len(updates), sum(counts)))
        for i, u in enumerate(updates):
            starts = np.cumsum((0,) + u.counts[:-1])
            out = np.cumsum((0,) + counts[:-1])
            for b, k in enumerate(u.counts):
                rows[i, out[b]:out[b] + k] = u.coefficients.double().numpy()[starts[b]:starts[b] + k]
    for aggregation, expected in [("median", np.median(rows, axis=0)),
                                  ("trimmed_mean", np.sort(rows, axis=0)[1:-1].mean(axis=0))]:
        agg = Aggregator(plan, aggregation=aggregation, trim_fraction=0.25)
        for u in updates:
            agg.add(u)
        got = agg.aggregate().coefficients[0].double().numpy()
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=0)


def test_robust_options_resist_a_scaled_client(round0):
    model, plan, updates = round0
    honest = updates[:3]
    attack = forged(updates[3], coefficients=updates[3].coefficients * -100)
    truth = Aggregator(plan, weighting="equal")
    for u in honest:
        truth.add(u)
    target = dense_rebuild(plan, truth.seed, *(lambda g: (g.counts[0], g.coefficients[0]))(truth.aggregate()))
    errors = {}
    for name, options in [("mean", {}), ("median", {"aggregation": "median"}),
                          ("norm_bound", {"norm_bound": 0.5})]:
        agg = Aggregator(plan, weighting="equal", max_step=None, influence_cap=None, **options)
        for u in honest + [attack]:
            agg.add(u)
        g = agg.aggregate()
        errors[name] = float((dense_rebuild(plan, g.seeds[0], g.counts[0], g.coefficients[0]) - target).norm())
    assert errors["median"] < errors["mean"] / 10
    assert errors["norm_bound"] < errors["mean"] / 10
    with pytest.raises(MessageError, match="seed"):
        Aggregator(plan, aggregation="median").add(client_update(plan, model, seed=4, nudge_seed=0)[0])


def dp_aggregator(plan, **dp_options):
    options = dict(noise_multiplier=1.0, clip_norm=0.5, expected_clients=4, seed=123)
    options.update(dp_options)
    return Aggregator(plan, weighting="equal", dp=fk.DifferentialPrivacy(**options))


def test_dp_clips_adds_calibrated_noise_and_accounts_epsilon(round0):
    pytest.importorskip("dp_accounting")
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    model, plan, _ = round0
    with pytest.raises(ValueError, match="equal"):
        Aggregator(plan, dp=fk.DifferentialPrivacy(1.0, 1.0, 2))
    agg = dp_aggregator(plan)
    assert sum(agg.counts) == plan.budget
    with pytest.raises(MessageError, match="counts"):
        agg.add(client_update(plan, model, seed=agg.seed, nudge_seed=0)[0])
    updates = [client_update(plan, model, seed=agg.seed, nudge_seed=i, counts=agg.counts)[0] for i in range(4)]
    for u in updates:
        agg.add(u)
    g = agg.aggregate()
    weights = agg._norm_weights(agg.counts)
    clipped = sum(u.coefficients.double() * min(1.0, 0.5 / agg.estimated_norm(u.counts, u.coefficients))
                  for u in updates) / 4
    noise = (g.coefficients[0].double() - clipped) * weights * 4 / (1.0 * 0.5)
    assert 0.2 < float(noise.std()) < 2.5  # unit-variance noise in the clipped sum's space (K = 12 draws)
    expected = rdp_privacy_accountant.RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)), 1)
    assert agg.dp_epsilon == pytest.approx(expected.get_epsilon(1e-5))
    assert agg.last_report["dp_epsilon"] == agg.dp_epsilon
    e1 = agg.dp_epsilon
    for u in updates:
        agg.add(forged(u, round=1, seed=agg.seed))
    agg.aggregate()
    assert agg.dp_epsilon > e1


def test_dp_noise_is_large_sample_gaussian():
    """The noise alone (no client moves): per-coordinate std z * C / (n sqrt(rho d_l))."""
    pytest.importorskip("dp_accounting")
    plan = FerretPlan.from_shapes([("w", (4096,), torch.float32)], 20000, grouping="tensor", backend=BACKEND)
    agg = dp_aggregator(plan, noise_multiplier=2.0, clip_norm=3.0, expected_clients=5)
    zero = ClientUpdate(0, agg.seed, agg.counts, torch.zeros(20000), 1, plan.fingerprint)
    agg.add(zero)
    noise = agg.aggregate().coefficients[0].double()
    expected_std = 2.0 * 3.0 / 5 / math.sqrt(4096)
    assert abs(float(noise.std()) / expected_std - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * expected_std / math.sqrt(20000)


@pytest.mark.parametrize("kind", ["momentum", "dp"])
def test_state_dict_resumes_bit_for_bit(kind):
    if kind == "dp":
        pytest.importorskip("dp_accounting")
    model = tiny_model()
    plan = FerretPlan.from_model(model, 12, backend=BACKEND)

    def make():
        if kind == "momentum":
            return Aggregator(plan, momentum=0.5, seed_schedule="fixed", base_seed=11)
        return dp_aggregator(plan)

    def run(agg, server, rounds):
        out = []
        for r in rounds:
            options = {"counts": agg.counts} if agg.counts else {}
            for i in range(2):
                agg.add(client_update(plan, server, seed=agg.seed, nudge_seed=10 * r + i, round=r, **options)[0])
            out.append(agg.apply_(server))
        return out

    straight, server = make(), copy.deepcopy(model)
    run(straight, server, range(3))
    first, resumed_server = make(), copy.deepcopy(model)
    run(first, resumed_server, range(2))
    state = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    from safetensors.torch import load, save

    state = load(save(state))
    second = make()
    second.load_state_dict(state)
    assert second.round == 2
    run(second, resumed_server, [2])
    assert torch.equal(flat(server), flat(resumed_server))
    if kind == "dp":
        assert second.dp_epsilon == pytest.approx(straight.dp_epsilon)
    with pytest.raises(ValueError, match="keys"):
        second.load_state_dict({"round": torch.tensor(0), "nonsense": torch.zeros(1)})


def test_encoding_is_the_same_in_every_process(round0):
    """The bytes do not follow the hash seed: encode in subprocesses with different
    PYTHONHASHSEED and compare."""
    script = (
        "import torch, hashlib, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_client_server import tiny_model, client_update\n"
        "from ferret_kernels import FerretPlan, Aggregator, wire\n"
        "m = tiny_model(); plan = FerretPlan.from_model(m, 12, backend='torch')\n"
        "agg = Aggregator(plan)\n"
        "u = client_update(plan, m, seed=agg.seed, nudge_seed=0)[0]; agg.add(u)\n"
        "a = wire.encode_client_update(u); b = wire.encode_global_update(agg.apply_(m))\n"
        "print(hashlib.sha256(a + b).hexdigest())\n"
    )
    digests = set()
    for seed in ("0", "1", "12345"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_star_import_does_not_load_transformers():
    code = ("import sys\nfrom ferret_kernels import *\nassert 'transformers' not in sys.modules, 'transformers'\n"
            "import ferret_kernels\nassert 'FerretCallback' not in ferret_kernels.__all__\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_imports_run_one_way():
    """plan <- messages <- client, server <- wire, hooks: no module imports one above it.

    Every module of the package is read; relative imports are resolved to the package's
    top-level module (a subpackage such as ``backends`` is one layer). The compile audit is a
    command-line tool that drives the public ops, above every layer, and nothing imports it."""
    import ast
    import pathlib

    layer = {"rng": 0, "layout": 0, "config": 0, "digest": 0, "robust": 0, "dp": 0, "backends": 1,
             "functional": 2, "plan": 3, "messages": 4, "client": 5, "server": 5, "wire": 6, "hooks": 6}
    root = pathlib.Path(fk.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in layer or parts == ("backends", "triton", "audit"):
            continue
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        level = layer[parts[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                target = (base + tuple(name.split(".")))[0]
                if target in layer:
                    assert layer[target] < level or target == parts[0], f"{'/'.join(parts)} imports {target}"


def test_a_decoded_update_is_checked_once(round0, monkeypatch):
    _, plan, updates = round0
    data = wire.encode_client_update(updates[0])
    calls = []
    original = messages.check_coefficients

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(messages, "check_coefficients", counted)
    monkeypatch.setattr(wire, "check_coefficients", counted)
    decoded = wire.decode_client_update(data, plan, round=0)
    agg = Aggregator(plan)
    agg.add(decoded)
    assert len(calls) == 1, calls
    agg.add(forged(updates[1]))  # built by hand: checked on add
    assert len(calls) == 2
    with pytest.raises(MessageError, match="finite"):
        agg.add(forged(updates[2], coefficients=torch.full_like(updates[2].coefficients, float("nan"))))


def test_refusals_before_add_are_reported_with_the_round(round0):
    _, plan, updates = round0
    agg = Aggregator(plan)
    try:
        wire.decode_client_update(b"garbage", plan, round=0)
    except MessageError as exc:
        agg.record_refusal(exc, client_id="n3")
    agg.add(updates[0], client_id="n1")
    try:
        agg.add(updates[0], client_id="n2")
    except MessageError as exc:
        agg.record_refusal(exc, client_id="n2")  # already recorded by add: not counted twice
    agg.aggregate()
    report = agg.last_report
    assert report["accepted"] == 1 and report["refused"] == 2
    assert report["refusal_reasons"] == {"truncated": 1, "duplicate": 1}
    assert [r["client_id"] for r in report["refusals"]] == ["n3", "n2"]
    assert agg.refusals == []


def test_default_trust_options_change_no_bits_of_an_honest_round(round0):
    """max_step, influence_cap, sample_cap and duplicate checks on (the defaults) vs off:
    the same bits."""
    model, plan, updates = round0
    outs = []
    for options in ({}, {"max_step": None, "sample_cap": None, "influence_cap": None}):
        agg = Aggregator(plan, server_lr=2.0, **options)
        for i, u in enumerate(updates):
            agg.add(u, client_id=i)
        server = copy.deepcopy(model)
        g = agg.apply_(server)
        outs.append((torch.cat(g.coefficients), flat(server)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_coefficients_too_large_for_float32_are_refused_whatever_the_server_lr(round0):
    """The kernels sum gamma_k v_k[j] in float32 before scaling by server_lr: a tiny (or
    zero) server_lr does not make 3e38 coefficients safe (hypothesis found inf * 0)."""
    model, plan, updates = round0
    huge = updates[0].coefficients.clone()
    huge[-1] = 2.7e38
    with pytest.raises(MessageError, match="float32") as info:
        Aggregator(plan, server_lr=1e-30, max_step=None).add(forged(updates[0], coefficients=huge))
    assert info.value.reason == "overflow"
    g = GlobalUpdate(0, (1,), (updates[0].counts,), (huge,), 0.0, plan.fingerprint, plan)
    target = copy.deepcopy(model)
    with pytest.raises(MessageError, match="float32 sum") as info:
        g.apply_(target)
    assert info.value.reason == "overflow" and torch.equal(flat(target), flat(model))


def test_influence_cap_refuses_an_outlier_relative_to_the_round(round0):
    model, plan, updates = round0
    loud = forged(updates[3], coefficients=updates[3].coefficients * 50)  # far below max_step, 50x the others
    agg = Aggregator(plan)
    for i, u in enumerate(updates[:3] + [loud]):
        agg.add(u, client_id=i)
    assert len(agg) == 4, "admitted at add: the absolute bound does not bind"
    g = agg.aggregate()
    assert agg.last_report["accepted"] == 3 and agg.last_report["refusals"][0]["client_id"] == 3
    assert agg.last_report["refusal_reasons"] == {"influence": 1}
    honest = Aggregator(plan)
    for u in updates[:3]:
        honest.add(u)
    assert torch.equal(torch.cat(g.coefficients), torch.cat(honest.aggregate().coefficients))
    two = Aggregator(plan)  # with two updates the median could be the outlier's own: no relative cap
    two.add(updates[0])
    two.add(loud)
    two.aggregate()
    assert two.last_report["accepted"] == 2
