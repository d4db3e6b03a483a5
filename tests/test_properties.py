"""Property-based tests (hypothesis) of the trust boundary; ``make fuzz`` runs the long fuzzer.

For any counts and finite float32 coefficients: the wire round trip is exact and
deterministic. For any byte string and any mutation of a valid message: decoding raises
MessageError or returns the original content. For any set of updates: the merge does not
depend on the order of ``add``; whatever the coefficients and server_lr, an accepted round
leaves every weight finite and moves none by more than ``max_step``.
"""

import copy

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ferret_kernels import Aggregator, FerretPlan, MessageError, wire  # noqa: E402
from ferret_kernels.messages import ClientUpdate, GlobalUpdate  # noqa: E402

BUDGET = 10
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


MODEL = tiny_model()
PLAN = FerretPlan.from_model(MODEL, BUDGET, grouping="tensor", backend="torch")
L = PLAN.num_blocks

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def counts(draw):
    cuts = sorted(draw(st.lists(st.integers(1, BUDGET - 1), min_size=L - 1, max_size=L - 1, unique=True)))
    edges = [0] + cuts + [BUDGET]
    return tuple(b - a for a, b in zip(edges, edges[1:], strict=False))


@st.composite
def client_updates(draw, values=finite32):
    c = draw(counts())
    coefficients = torch.tensor(draw(st.lists(values, min_size=BUDGET, max_size=BUDGET)), dtype=torch.float32)
    return ClientUpdate(draw(st.integers(0, 2**40)), draw(st.integers(0, 2**64 - 1)), c, coefficients,
                        draw(st.integers(1, 2**62)), PLAN.fingerprint)


@SETTINGS
@given(client_updates())
def test_client_round_trip_is_exact_and_deterministic(update):
    data = wire.encode_client_update(update)
    assert wire.encode_client_update(update) == data
    back = wire.decode_client_update(data, PLAN)
    assert (back.round, back.seed, back.counts, back.num_samples) == (update.round, update.seed, update.counts,
                                                                       update.num_samples)
    assert torch.equal(back.coefficients.view(torch.int32), update.coefficients.view(torch.int32))


@SETTINGS
@given(st.binary(max_size=2048))
def test_any_bytes_raise_only_message_error(data):
    for decode in (wire.decode_client_update, wire.decode_global_update):
        with pytest.raises(MessageError):
            decode(data, PLAN)


@SETTINGS
@given(client_updates(), st.data())
def test_any_mutation_is_refused_or_harmless(update, data):
    message = wire.encode_client_update(update)
    mutated = bytearray(message)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    mutated = bytes(mutated[:cut])
    try:
        back = wire.decode_client_update(mutated, PLAN)
    except MessageError:
        return
    assert mutated == message, "only the unchanged message may decode"
    assert torch.equal(back.coefficients.view(torch.int32), update.coefficients.view(torch.int32))


@SETTINGS
@given(st.lists(client_updates(st.floats(-1, 1, width=32)), min_size=2, max_size=5), st.randoms(),
       st.sampled_from(["mean", "median", "trimmed_mean"]))
def test_merge_is_independent_of_add_order(updates, rnd, aggregation):
    seed = Aggregator(PLAN).seed
    updates = [ClientUpdate(0, seed, u.counts, u.coefficients, u.num_samples, u.fingerprint) for u in updates]
    results = set()
    for _ in range(3):
        order = list(range(len(updates)))
        rnd.shuffle(order)
        agg = Aggregator(PLAN, aggregation=aggregation, max_step=None)
        for i in order:
            try:
                agg.add(updates[i])
            except MessageError as exc:
                assert exc.reason == "duplicate"
        results.add(tuple(agg.aggregate().coefficients[0].view(torch.int32).tolist()))
    assert len(results) == 1


@SETTINGS
@given(client_updates(finite32), st.floats(1e-6, 1e30), st.floats(1e-3, 1e3))
def test_accepted_rounds_stay_finite_and_bounded(update, server_lr, max_step):
    agg = Aggregator(PLAN, server_lr=server_lr, max_step=max_step)
    update = ClientUpdate(0, agg.seed, update.counts, update.coefficients, 1, PLAN.fingerprint)
    model = copy.deepcopy(MODEL)
    try:
        agg.add(update)
    except MessageError as exc:
        assert exc.reason == "influence"
        return
    before = [p.detach().clone() for p in model.parameters()]
    g = agg.apply_(model)
    for p, b in zip(model.parameters(), before, strict=True):
        assert bool(torch.isfinite(p).all())
        assert float((p.detach() - b).abs().max()) <= max_step * (1 + 1e-5)
    assert float(g.step_bounds().max()) <= max_step * (1 + 1e-5)


@SETTINGS
@given(st.floats(-1e308, 1e308), st.lists(finite32, min_size=BUDGET, max_size=BUDGET))
def test_any_downlink_leaves_weights_finite(server_lr, values):
    g = GlobalUpdate(0, (5,), (tuple([1] * (L - 1) + [BUDGET - L + 1]),), (torch.tensor(values),), server_lr,
                     PLAN.fingerprint, PLAN)
    model = copy.deepcopy(MODEL)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        g.apply_(model)
    except MessageError as exc:
        assert exc.reason in ("overflow", "field")  # field: server_lr not finite in float32
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        return
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
