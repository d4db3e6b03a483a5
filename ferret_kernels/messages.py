"""The two messages of a Ferret round and the one place they are checked.

``ClientUpdate`` (client -> server: K coefficients of one client's update) and
``GlobalUpdate`` (server -> every client: the merged coefficients, replayed with
``apply_``). Client, server, wire and hooks import them from here; this module imports
only the plan and the kernels below it.

Every refusal of a message - malformed bytes, a field that does not fit the plan, an
update that would move weights too far or out of the finite range - raises
``MessageError``, a ``ValueError`` whose ``reason`` is one short code from ``REASONS``
(for metrics and logs) and whose text names the field and the fix.

A message is checked once. ``wire.decode_*`` and ``ClientRound`` return messages
marked as checked against their plan; ``Aggregator.add`` and ``GlobalUpdate.apply_``
re-check only messages that are not (built by hand), plus what depends on their own
context (round, seed, duplicates, bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import backends, functional, rng
from .digest import check_digest_text
from .plan import SCALES, FerretPlan, coefficient_blocks


class MessageError(ValueError):
    """A refused message. ``reason``: one code of ``REASONS``; the text says what and why."""

    def __init__(self, message: str, *, reason: str):
        if reason not in REASONS:
            raise AssertionError(f"unknown MessageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


# reason -> what it means. Stable strings: apps count refusals by them.
REASONS = {
    "type": "not bytes, or not a message object",
    "truncated": "shorter or longer than its own header says",
    "header": "header not a well-formed Ferret safetensors header (JSON, keys, sizes, offsets)",
    "format": "another message kind, wire version or RNG contract",
    "fingerprint": "made for another plan (model, grouping, distribution)",
    "digest": "content does not match its digest (corrupted in transit)",
    "field": "a metadata field is malformed or out of range (round, seed, counts, scale, server_lr, ...)",
    "round": "made for another round",
    "coefficients": "coefficients of the wrong dtype, shape or length, or not finite",
    "seed": "seed the aggregation rule needs shared (momentum, robust, DP) differs",
    "duplicate": "this client, or this exact update, was already counted this round",
    "influence": "one client's update could move a weight more than the server allows",
    "overflow": "applying it could make a weight non-finite",
    "start_digest": "the model does not hold the weights this update starts from",
}

# The coefficient dtypes a message may travel in: (short name, dtype, safetensors code).
# wire.DTYPES, the wire's dtype codes and Aggregator's wire_dtype all derive from this.
WIRE_DTYPE_TABLE = (("fp32", torch.float32, "F32"), ("fp16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16"))
WIRE_DTYPES = tuple(dtype for _, dtype, _ in WIRE_DTYPE_TABLE)
WIRE_DTYPE_NAMES = {name: dtype for short, dtype, _ in WIRE_DTYPE_TABLE
                    for name in (short, str(dtype).removeprefix("torch."))}

# Largest |v_k[j]| of any basis element under the RNG contract (docs/rng.md): the gaussian
# radius sqrt(-2 log u) is largest at the smallest uniform u = 2**-24, where the contract's
# float32 log and correctly rounded sqrt give exactly this float32 (|cos|, |sin| <= 1, so
# r*cos rounds to at most r). tests/test_bounds.py recomputes it over all 2**23 uniforms.
# A rebuilt block therefore obeys |sum_k gamma_k v_k[j]| <= BASIS_BOUND * sum_k |gamma_k|.
BASIS_BOUND = {"gaussian": 5.7681074142456055, "rademacher": 1.0}

# Relative headroom kept below the model dtype's largest finite value for the final
# float32 add and the rounding to the model's dtype (bfloat16: 2**-9 relative).
OVERFLOW_MARGIN = 2.0**-8

# Relative float32 rounding error per accumulated term of a rebuild (2**-24 for the add,
# doubled for the product): a rebuilt element of n terms is within (1 + n * 2**-23) of
# its exact value's bound.
ACCUMULATION_ERROR = 2.0**-23

FLOAT32_MAX = torch.finfo(torch.float32).max

# The largest float32 sum of coefficient times basis element a rebuild may form.
ACCUMULATOR_LIMIT = FLOAT32_MAX * (1 - OVERFLOW_MARGIN)

# Blocks whose step bound is below this fraction of their dtype's largest value are not
# read before a write (reading costs two passes over d, ~5% of a CPU apply): only a
# weight already within this fraction of the largest value could overflow there.
SCAN_FRACTION = 2.0**-20


def wire_dtype(dtype) -> torch.dtype:
    """The coefficient dtype named by ``dtype``: a torch dtype or a name of ``WIRE_DTYPE_NAMES``."""
    if isinstance(dtype, str):
        if dtype not in WIRE_DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPE_NAMES)} or a torch dtype; got {dtype!r}")
        return WIRE_DTYPE_NAMES[dtype]
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    return dtype


def check_fingerprint(fingerprint, plan: FerretPlan, what: str) -> None:
    if fingerprint != plan.fingerprint:
        raise MessageError(
            f"{what}.fingerprint {str(fingerprint)[:16]}... does not match the plan's {plan.fingerprint[:16]}...: "
            "client and server must build the plan from the same model (parameter names, shapes, dtypes, which are "
            f"trainable, buffers), grouping and distribution, with the same RNG contract (v{rng.CONTRACT_VERSION})",
            reason="fingerprint")


def check_round(value, expected: int | None, what: str) -> None:
    check_uint(value, f"{what}.round", 2**63)
    if expected is not None and value != expected:
        raise MessageError(f"{what}.round is {value} but round {expected} was expected: it belongs to another "
                           "round's weights; drop it, or resend it for the current round", reason="round")


def check_uint(value, name: str, high: int, *, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise MessageError(f"{name} must be an int in [{low}, {high}); got {value!r}", reason="field")


def check_counts(plan: FerretPlan, counts, what: str, *, exact_budget: bool) -> tuple[int, ...]:
    """``plan.check_counts`` for a message: the same checks, refused as MessageError."""
    if not isinstance(counts, (tuple, list)) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                        for c in counts):
        raise MessageError(f"{what} must be a tuple of ints", reason="field")
    try:
        return plan.check_counts(counts, what=what, exact_budget=exact_budget)
    except ValueError as exc:
        raise MessageError(str(exc), reason="field") from None


def check_coefficients(coefficients, length: int, name: str) -> None:
    if not isinstance(coefficients, torch.Tensor):
        raise MessageError(f"{name} must be a torch.Tensor; got {type(coefficients).__name__}", reason="coefficients")
    if coefficients.dtype != torch.float32 or coefficients.dim() != 1 or coefficients.device.type != "cpu":
        raise MessageError(f"{name} must be a 1-D float32 CPU tensor; got {coefficients.dtype} of shape "
                           f"{tuple(coefficients.shape)} on {coefficients.device}", reason="coefficients")
    if coefficients.numel() != length:
        raise MessageError(f"{name} has {coefficients.numel()} values but the counts add up to {length}",
                           reason="coefficients")
    if not bool(torch.isfinite(coefficients).all()):
        bad = int((~torch.isfinite(coefficients)).nonzero()[0, 0])
        raise MessageError(f"{name}[{bad}] is {float(coefficients[bad])}: coefficients must be finite (a client whose "
                           "training diverged must not send)", reason="coefficients")


def check_scale(scale, plan: FerretPlan, what: str) -> None:
    if scale not in SCALES:
        raise MessageError(f"{what}.scale is {scale!r}; expected one of {SCALES}", reason="field")
    if scale != plan.scale:
        raise MessageError(f"{what}.scale is {scale!r} but the plan's is {plan.scale!r}: give client and server plans "
                           "the same scale=", reason="field")


def check_server_lr(server_lr, what: str) -> float:
    """``server_lr`` as a float; it must be finite in float32, the precision the kernels
    step in (a larger value becomes an infinite alpha, and inf * 0 is NaN)."""
    if (isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not math.isfinite(server_lr)
            or abs(server_lr) > FLOAT32_MAX):
        raise MessageError(f"{what} must be a number of magnitude at most {FLOAT32_MAX:.4g} (finite in float32); got "
                           f"{server_lr!r}", reason="field")
    return float(server_lr)


def block_l1(plan: FerretPlan, counts: Sequence[int], coefficients: torch.Tensor, *, repeats: int = 1) -> torch.Tensor:
    """float64 (L,): sum_k |gamma_k| per block (block l's coefficients at sum_{m<l} counts[m]).
    With ``repeats`` = G, ``counts`` holds G layouts one after the other (G * L entries)
    and ``coefficients`` their concatenation: the sums are over all of them."""
    blocks = coefficient_blocks(counts) % plan.num_blocks if repeats > 1 else coefficient_blocks(counts)
    out = torch.zeros(plan.num_blocks, dtype=torch.float64)
    return out.index_add_(0, blocks, coefficients.double().abs())


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """What a client sends after a round.

    round: the round whose global weights the client started from. seed: the uint64 RNG
    seed its bases came from. counts: K_l per block (L ints >= 1, sum == plan budget);
    block l used bases k = 0..K_l-1 of RNG block l. coefficients: float32 CPU tensor
    (sum K_l,), block l's at sum_{m<l} K_m, already scaled (see ``scale``), so the rebuilt
    update is sum_l V_l^T gamma_l. num_samples: local examples (for sample weighting).
    fingerprint: the plan's. scale: "unbiased" or "paper".
    """

    round: int
    seed: int
    counts: tuple[int, ...]
    coefficients: torch.Tensor
    num_samples: int
    fingerprint: str
    scale: str = "unbiased"
    # the message_key of the plan this object was checked against (set by decode and
    # ClientRound); None for an object built by hand, which is checked when used
    _checked: str | None = field(default=None, init=False, repr=False, compare=False)

    def check(self, plan: FerretPlan, *, round: int | None = None) -> None:
        """Raise MessageError, naming the field and the fix, unless this update fits ``plan``
        (and ``round`` when given). Marks the update as checked against ``plan``."""
        what = "ClientUpdate"
        check_fingerprint(self.fingerprint, plan, what)
        check_round(self.round, round, what)
        if self._checked == plan.message_key:
            return
        check_uint(self.seed, f"{what}.seed", 2**64)
        check_uint(self.num_samples, f"{what}.num_samples", 2**63, low=1)
        check_scale(self.scale, plan, what)
        counts = check_counts(plan, self.counts, f"{what}.counts", exact_budget=True)
        check_coefficients(self.coefficients, sum(counts), f"{what}.coefficients")
        object.__setattr__(self, "_checked", plan.message_key)

    def block_l1(self, plan: FerretPlan) -> torch.Tensor:
        """float64 (L,): sum_k |gamma_k| of each block; with ``BASIS_BOUND`` the most this
        update (unweighted, server_lr 1) can move any weight of the block."""
        return block_l1(plan, self.counts, self.coefficients)


@dataclass(frozen=True, eq=False)
class GlobalUpdate:
    """What the server applied in a round, enough for a client to replay it.

    round: the round whose starting weights it applies to. seeds: the distinct uint64
    seeds, in application order. counts[g]: K_l per block for seed g (bases k = 0..K_l-1
    of RNG block l). coefficients[g]: float32 CPU (sum counts[g],), block l's at
    sum_{m<l} counts[g][m], after weighting, robust merging, noise, momentum and
    clipping. server_lr: the step, w <- w - server_lr * sum_g V_g^T coefficients[g].
    fingerprint: the plan's. plan: the plan it was made or decoded with (not sent;
    ``apply_`` uses it). start_digest: ``plan.digest`` of the weights it applies to
    (``"xxh3_128:..."``), or None when the server did not name them; ``apply_`` refuses
    a model whose digest differs (applied twice, another round, another model).
    """

    round: int
    seeds: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    coefficients: tuple[torch.Tensor, ...]
    server_lr: float
    fingerprint: str
    plan: FerretPlan | None = field(default=None, repr=False)
    start_digest: str | None = None
    _checked: str | None = field(default=None, init=False, repr=False, compare=False)

    def check(self, plan: FerretPlan, *, round: int | None = None) -> None:
        """Raise MessageError, naming the field and the fix, unless this fits ``plan``."""
        what = "GlobalUpdate"
        check_fingerprint(self.fingerprint, plan, what)
        check_round(self.round, round, what)
        if self._checked == plan.message_key:
            return
        if not isinstance(self.server_lr, float):
            raise MessageError(f"{what}.server_lr must be a float; got {self.server_lr!r}", reason="field")
        check_server_lr(self.server_lr, f"{what}.server_lr")
        if self.start_digest is not None:
            try:
                check_digest_text(self.start_digest, f"{what}.start_digest")
            except ValueError as exc:
                raise MessageError(str(exc), reason="field") from None
        if not (isinstance(self.seeds, tuple) and isinstance(self.counts, tuple)
                and isinstance(self.coefficients, tuple)
                and len(self.seeds) == len(self.counts) == len(self.coefficients) >= 1):
            raise MessageError(f"{what} needs tuples of seeds, count lists and coefficient tensors, one of each per "
                               "seed (at least one)", reason="field")
        for g, seed in enumerate(self.seeds):
            check_uint(seed, f"{what}.seeds[{g}]", 2**64)
        if len(set(self.seeds)) != len(self.seeds):
            raise MessageError(f"{what}.seeds repeats a seed: merge the coefficients of one seed into one entry",
                               reason="field")
        for g, (counts, coefficients) in enumerate(zip(self.counts, self.coefficients, strict=True)):
            counts = check_counts(plan, counts, f"{what}.counts[{g}]", exact_budget=False)
            check_coefficients(coefficients, sum(counts), f"{what}.coefficients[{g}]")
        object.__setattr__(self, "_checked", plan.message_key)

    def accumulation_bounds(self, plan: FerretPlan | None = None) -> torch.Tensor:
        """float64 (L,): the most |sum_g sum_k gamma_{g,k} v_k[j]| can reach in each block,
        BASIS_BOUND * sum |gamma|, widened by the float32 accumulation error of the
        terms. The kernels accumulate this sum in float32 before scaling by server_lr,
        so it must be finite in float32 whatever server_lr is."""
        plan = self._plan(plan)
        counts = torch.tensor(self.counts, dtype=torch.int64)  # (G, L): one pass for all seeds
        l1 = block_l1(plan, counts.reshape(-1).tolist(), torch.cat(self.coefficients), repeats=len(self.seeds))
        terms = counts.sum(dim=0).double()
        return l1 * BASIS_BOUND[plan.distribution] * (1 + (terms + 1) * ACCUMULATION_ERROR)

    def step_bounds(self, plan: FerretPlan | None = None) -> torch.Tensor:
        """float64 (L,): the most ``apply_`` can move any weight of each block, known before
        any write: |server_lr| * ``accumulation_bounds``."""
        return self.accumulation_bounds(plan) * abs(self.server_lr)

    def apply_(self, model: torch.nn.Module, *, plan: FerretPlan | None = None, round: int | None = None,
               backend: str | None = None, max_step: float | None = None,
               check_start: bool = True) -> torch.nn.Module:
        """w <- w - server_lr * sum_g V_g^T gamma_g in place, one launch for all seeds.

        Everything is checked before the first write, so a refused update leaves the model
        untouched: plan, model, backend, the starting-weights digest (``check_start``;
        when the update carries one), and that no weight can leave the finite range of
        its dtype (``step_bounds``); ``max_step`` also refuses an update that could move
        some weight by more than that. Refusals raise MessageError.
        """
        plan = self._plan(plan)
        self.check(plan, round=round)
        params = plan.parameters(model)
        device = params[0].device
        name = backends.resolve(plan.backend if backend is None else backend, device)
        backends.module(name)
        if check_start and self.start_digest is not None:
            have = plan.digest(model)
            if have != self.start_digest:
                raise MessageError(
                    f"the model's weights (digest {have[9:21]}...) are not the ones GlobalUpdate of round {self.round} "
                    f"starts from ({self.start_digest[9:21]}...): it was already applied, the model is at another "
                    "round, or it is another model. Replay the missed rounds in order from the weights they start "
                    "from, or fetch the server's weights", reason="start_digest")
        accumulated = self.accumulation_bounds(plan)
        if not bool((accumulated <= ACCUMULATOR_LIMIT).all()):
            b = int((~(accumulated <= ACCUMULATOR_LIMIT)).nonzero()[0, 0])
            raise MessageError(f"GlobalUpdate of round {self.round} has coefficients so large in block {b} that their "
                               f"float32 sum could overflow (bound {float(accumulated[b]):.3g}): refused before any "
                               "write", reason="overflow")
        bounds = accumulated * abs(self.server_lr)
        if max_step is not None and float(bounds.max()) > max_step:
            b = int(bounds.argmax())
            raise MessageError(f"GlobalUpdate of round {self.round} could move a weight of block {b} "
                               f"({', '.join(plan.block_names[b])}) by up to {float(bounds[b]):.3g}, more than "
                               f"max_step={max_step:g}", reason="influence")
        check_finite_result(plan, params, bounds, f"GlobalUpdate of round {self.round}")
        coefficients = [c.to(device) for c in self.coefficients]
        with torch.no_grad():
            live = [p.detach() for p in params]
            functional.reconstruct_blocks_(live, plan.block_sizes, [list(c) for c in self.counts],
                                           torch.cat(coefficients), list(self.seeds), alpha=-self.server_lr,
                                           distribution=plan.distribution, backend=name)
        return model

    def _plan(self, plan: FerretPlan | None) -> FerretPlan:
        plan = self.plan if plan is None else plan
        if plan is None:
            raise ValueError("this GlobalUpdate carries no plan: pass plan= (the FerretPlan both sides built)")
        return plan


def _max_abs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    t = t.detach()
    return float(torch.stack([t.amax().abs(), t.amin().abs()]).double().max())  # NaN propagates


def check_finite_result(plan: FerretPlan, params: Sequence[torch.Tensor], bounds: torch.Tensor, what: str) -> None:
    """MessageError unless, in every block, max |w| plus the step bound stays below the
    largest finite value of the block's dtypes (less ``OVERFLOW_MARGIN``): then the
    float32 accumulation and the rounded result are finite by construction.

    The weights are read (two reduction passes) only for blocks whose bound exceeds
    ``SCAN_FRACTION`` of that limit; any other block can only overflow if a weight
    already lies within that fraction of its dtype's largest value.
    """
    limit = [math.inf] * plan.num_blocks
    for s in plan.segments:
        dtype_max = torch.finfo(params[s.tensor_index].dtype).max * (1 - OVERFLOW_MARGIN)
        limit[s.block] = min(limit[s.block], dtype_max)
    limit = torch.tensor(limit, dtype=torch.float64)
    scan = ~(bounds <= limit * SCAN_FRACTION)
    block_max = torch.zeros(plan.num_blocks, dtype=torch.float64)
    if bool(scan.any()):
        tensor_max: dict[int, float] = {}
        for s in plan.segments:
            if scan[s.block]:
                if s.tensor_index not in tensor_max:
                    tensor_max[s.tensor_index] = _max_abs(params[s.tensor_index])
                block_max[s.block] = torch.maximum(block_max[s.block],
                                                   torch.tensor(tensor_max[s.tensor_index], dtype=torch.float64))
    room = torch.where(scan, limit - block_max, limit * (1 - SCAN_FRACTION))
    bad = ~(bounds <= room)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        if not math.isfinite(float(block_max[b])):
            raise ValueError(f"block {b} ({', '.join(plan.block_names[b])}) already holds non-finite weights: the "
                             "model is corrupted; reload it")
        raise MessageError(f"{what} could move a weight of block {b} ({', '.join(plan.block_names[b])}) by up to "
                           f"{float(bounds[b]):.3g}, past the largest finite value of its dtype (max |w| there is "
                           f"{float(block_max[b]):.3g}): refused before any write", reason="overflow")
