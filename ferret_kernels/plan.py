"""The block plan: which parameters form which block, and how K bases are split over them.

Grouping follows the paper's reference code by default: walk the trainable parameters in
``named_parameters`` order and close a block before a tensor that would take it past
0.9 x the median tensor size, so a block is about one weight matrix and the small tensors
around it (194 blocks for a 24-layer LLaMA). Allocation splits an exact budget K over
blocks, at least one basis each, by default in proportion to the block's update norm.

``FerretPlan`` ties these together with everything client and server must agree on; its
``fingerprint`` (sha256 over parameter names, shapes, dtypes, the grouping, the block
sizes, the distribution, the RNG contract version and, when a model has them, which
floating-point buffers travel or stay frozen) travels with every message.

Floating-point buffers (BatchNorm running statistics, ...) are model state that training
changes without gradients. A plan never ignores one silently: ``from_model`` refuses a
model with persistent float buffers unless told ``buffers="include"`` (they travel in the
update vector like parameters) or ``buffers="frozen"`` (they must not change; each client
round verifies it, and ``digest`` covers them). Non-persistent float buffers (LLaMA's
rotary ``inv_freq``, derived from the config) are treated as frozen: verified unchanged
by each client round, left out of the fingerprint and the digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import rng
from .digest import tensors_digest
from .layout import SUPPORTED_DTYPES, BlockLayout, Segment

# The reference code's threshold: a block closes before it would pass this fraction of
# the median tensor size.
MEDIAN_FRACTION = 0.9

ALLOCATIONS = ("norm", "sqrt_norm", "size", "uniform")

# How the client scales block l's coefficients: "unbiased" by 1/(rho K_l), so that
# E[rebuilt] = update; "paper" to the reference code's magnitude (see ``parity_factor``).
SCALES = ("unbiased", "paper")

# How the round seed follows the round number (``round_seed``).
SEED_SCHEDULES = ("per_round", "fixed")

PLAN_FORMAT = "ferret-plan/1"

# Counts, sums of counts and budgets travel as 32-bit integers.
MAX_BUDGET = 2**31 - 1

# What a plan does with a model's persistent floating-point buffers (module docstring).
BUFFER_POLICIES = ("refuse", "include", "frozen")

# ``ClientRound`` (client.py) registers itself here at import, so that
# ``plan.client_round(...)`` works while imports run one way (client imports plan).
_client_round_class = None


def register_client_round(cls) -> None:
    global _client_round_class
    _client_round_class = cls


def paper_blocks(numels: Sequence[int]) -> list[list[int]]:
    """Indices of the tensors in each block, grouping as the paper's code does."""
    if not numels:
        raise ValueError("numels is empty: the model has no trainable parameters")
    limit = MEDIAN_FRACTION * float(torch.tensor([float(n) for n in numels]).median())
    blocks, current, size = [], [], 0
    for i, n in enumerate(numels):
        if current and size + n > limit:
            blocks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    blocks.append(current)
    return blocks


def allocate(budget: int, weights: Sequence[float]) -> list[int]:
    """Split ``budget`` into one count per block, each >= 1, summing to ``budget``.

    Counts are 1 + the largest-remainder rounding of (budget - L) * w_l / sum(w); with
    all-zero weights the split is uniform. Deterministic: ties go to the lower index.
    """
    L = len(weights)
    if L == 0:
        raise ValueError("weights is empty: nothing to allocate over")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < L:
        raise ValueError(f"budget must be an int >= the number of blocks ({L}); got {budget}")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError("weights must be finite and >= 0 (a NaN update norm means the local step diverged)")
    total = sum(w)
    if total == 0:
        w, total = [1.0] * L, float(L)
    spare = budget - L
    shares = [spare * x / total for x in w]
    counts = [math.floor(s) for s in shares]
    left = spare - sum(counts)
    order = sorted(range(L), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return [1 + c for c in counts]


def allocation_weights(method: str, norms: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Per-block weights for ``allocate``: the paper's default is ``norm``."""
    if method == "norm":
        return list(norms)
    if method == "sqrt_norm":
        return [math.sqrt(n) for n in norms]
    if method == "size":
        return [float(s) for s in sizes]
    if method == "uniform":
        return [1.0] * len(sizes)
    raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {method!r}")


def sized_blocks(numels: Sequence[int], target: int) -> list[int]:
    """Block sizes for a target block size: whole tensors packed greedily up to ``target``
    elements; a tensor larger than ``target`` gets blocks of its own, split into
    ceil(n / target) near-equal parts (the layout cuts tensors at block boundaries)."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"grouping must be 'paper', 'tensor' or an int block size >= 1; got {target!r}")
    sizes, current = [], 0
    for n in numels:
        if n > target:
            if current:
                sizes.append(current)
                current = 0
            parts = -(-n // target)
            sizes.extend(n // parts + (1 if i < n % parts else 0) for i in range(parts))
            continue
        if current and current + n > target:
            sizes.append(current)
            current = 0
        current += n
    if current:
        sizes.append(current)
    return sizes


def round_seed(base_seed: int, round: int, schedule: str = "per_round") -> int:
    """The seed every client of ``round`` uses: ``base_seed`` itself under the ``fixed``
    schedule; under ``per_round`` the first 8 bytes (little-endian) of
    sha256("ferret-round-seed/<base_seed>/<round>"), a uint64 that client and server
    derive alike without talking."""
    base_seed = rng.check_seed(base_seed)
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an int >= 0; got {round!r}")
    if schedule == "fixed":
        return base_seed
    if schedule != "per_round":
        raise ValueError(f"seed schedule must be one of {SEED_SCHEDULES}; got {schedule!r}")
    digest = hashlib.sha256(f"ferret-round-seed/{base_seed}/{round}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def parity_factor(d: int) -> float:
    """d * Var of N(0, 1) truncated to [-1/sqrt(d), 1/sqrt(d)]: about 1/3.

    The reference code draws such bases u and rebuilds (d_l / n_l) sum_k u_k u_k^T delta,
    whose mean is parity_factor(d_l) * delta. Scaling our unit-variance coefficients by
    parity_factor(d_l) / (rho K_l) gives the same mean, so server learning rates tuned
    on the reference code carry over. Series in a^2 = 1/d (exact to float64 rounding).
    """
    a2 = 1.0 / d
    s1 = s3 = 0.0
    term = 1.0
    for n in range(40):
        s1 += term / (2 * n + 1)
        s3 += term / (2 * n + 3)
        term *= -a2 / 2 / (n + 1)
    return s3 / s1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, repr=False)
class FerretPlan:
    """Everything client and server must agree on to exchange Ferret updates.

    The vector is the flattened concatenation of the trainable parameters (requires_grad,
    ``named_parameters`` order, tied weights once), cut into L blocks of ``block_sizes``
    elements; block l draws bases k = 0..K_l-1 of RNG block id l under the round's seed.
    ``budget`` is K = sum_l K_l, the coefficients each client sends. ``allocation``,
    ``scale`` and ``backend`` are the defaults a client round uses; only ``scale`` is
    checked across peers (each update carries it) and none enters the fingerprint, which
    covers what changes the meaning of a coefficient. ``buffer_names``: the entries of
    ``names`` that are floating-point buffers travelling like parameters (the last ones);
    ``frozen_buffers``: persistent float buffers that must not change (module docstring).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    budget: int
    grouping: str | int = "paper"
    distribution: str = "gaussian"
    allocation: str = "norm"
    scale: str = "unbiased"
    backend: str = "auto"
    buffer_names: tuple[str, ...] = ()
    frozen_buffers: tuple[str, ...] = ()
    block_sizes: tuple[int, ...] = field(init=False)
    fingerprint: str = field(init=False)
    segments: tuple[Segment, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        names, dtypes = tuple(self.names), tuple(self.dtypes)
        buffer_names, frozen = tuple(self.buffer_names), tuple(self.frozen_buffers)
        shapes = tuple(tuple(int(n) for n in s) for s in self.shapes)
        if not names:
            raise ValueError("the plan has no parameters: the model has no trainable (requires_grad) parameters")
        if not len(names) == len(shapes) == len(dtypes):
            raise ValueError("names, shapes and dtypes must have one entry per parameter")
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for n, s, t in zip(names, shapes, dtypes, strict=True):
            if t not in SUPPORTED_DTYPES:
                raise TypeError(f"parameter {n!r} has dtype {t}; supported: float32, bfloat16, float16")
            if math.prod(s) == 0:
                raise ValueError(f"parameter {n!r} has no elements (shape {s}): freeze it (requires_grad=False)")
        if self.distribution not in rng.DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {rng.DISTRIBUTIONS}; got {self.distribution!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {self.allocation!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}; got {self.scale!r}")
        if buffer_names and names[-len(buffer_names):] != buffer_names:
            raise ValueError("buffer_names must be the last entries of names (buffers follow the parameters)")
        if set(frozen) & set(names) or len(set(frozen)) != len(frozen):
            raise ValueError("frozen_buffers must be distinct names that do not travel (not in names)")
        numels = [math.prod(s) for s in shapes]
        if self.grouping == "paper":
            sizes = [sum(numels[i] for i in g) for g in paper_blocks(numels)]
        elif self.grouping == "tensor":
            sizes = list(numels)
        else:
            sizes = sized_blocks(numels, self.grouping)
        L = len(sizes)
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or not L <= self.budget <= MAX_BUDGET:
            raise ValueError(f"budget must be an int in [{L}, {MAX_BUDGET}] (at least one basis for each of the "
                             f"{L} blocks); got {self.budget!r}. Raise the budget or use larger blocks (grouping=)")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "buffer_names", buffer_names)
        object.__setattr__(self, "frozen_buffers", frozen)
        object.__setattr__(self, "block_sizes", tuple(sizes))
        layout = BlockLayout.build(sizes, [1] * L)
        object.__setattr__(self, "segments", tuple(layout.segments(numels)))
        payload = {
            "format": PLAN_FORMAT,
            "contract": rng.CONTRACT_VERSION,
            "names": list(names),
            "shapes": [list(s) for s in shapes],
            "dtypes": [_dtype_name(t) for t in dtypes],
            "grouping": self.grouping,
            "block_sizes": sizes,
            "distribution": self.distribution,
        }
        # only when present, so plans of buffer-free models keep their fingerprints
        if buffer_names:
            payload["buffers"] = list(buffer_names)
        if frozen:
            payload["frozen_buffers"] = list(frozen)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "fingerprint", hashlib.sha256(text.encode()).hexdigest())

    def __repr__(self) -> str:
        return (f"FerretPlan(parameters={len(self.names)}, d={self.numel}, blocks={self.num_blocks}, "
                f"budget={self.budget}, grouping={self.grouping!r}, distribution={self.distribution!r}, "
                f"allocation={self.allocation!r}, scale={self.scale!r}, backend={self.backend!r}, "
                f"fingerprint={self.fingerprint[:12]}...)")

    @classmethod
    def from_shapes(cls, named_shapes, budget: int, **options) -> FerretPlan:
        """A plan from ``(name, shape, dtype)`` triples in parameter order (no model needed)."""
        triples = [(str(n), tuple(s), t) for n, s, t in named_shapes]
        return cls(tuple(n for n, _, _ in triples), tuple(s for _, s, _ in triples),
                   tuple(t for _, _, t in triples), budget, **options)

    @classmethod
    def from_model(cls, model: torch.nn.Module, budget: int, *, grouping: str | int = "paper",
                   distribution: str = "gaussian", allocation: str = "norm", scale: str = "unbiased",
                   backend: str = "auto", buffers: str = "refuse") -> FerretPlan:
        """The plan over ``model``'s trainable parameters.

        grouping: "paper" (the reference code's rule), "tensor" (one block per tensor) or
        an int target block size (see ``sized_blocks``). budget: K, total coefficients a
        client sends per round, >= the number of blocks. buffers: what to do with
        persistent floating-point buffers (``BUFFER_POLICIES``, module docstring).
        """
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}; got {buffers!r}")
        named = _trainable(model)
        persistent = [(n, b) for n, b, keep in _float_buffers(model) if keep]
        if persistent and buffers == "refuse":
            listed = ", ".join(f"{n} {tuple(b.shape)}" for n, b in persistent[:4])
            raise ValueError(
                f"the model has {len(persistent)} persistent floating-point buffers ({listed}"
                f"{', ...' if len(persistent) > 4 else ''}) that training may change without gradients (BatchNorm "
                "running statistics): peers would silently diverge. Pass buffers='include' to send their change in "
                "the update like parameters, or buffers='frozen' if they never change in training (e.g. BatchNorm "
                "layers kept in eval mode; every client round then verifies it)")
        named_buffers = persistent if buffers == "include" else []
        frozen = tuple(n for n, _ in persistent) if buffers == "frozen" else ()
        triples = [(n, p.shape, p.dtype) for n, p in named + named_buffers]
        return cls.from_shapes(triples, budget, grouping=grouping, distribution=distribution, allocation=allocation,
                               scale=scale, backend=backend, buffer_names=tuple(n for n, _ in named_buffers),
                               frozen_buffers=frozen)

    @property
    def message_key(self) -> str:
        """Everything a message check depends on (fingerprint, budget, scale): a message
        checked against one plan is valid for every plan with the same key."""
        return f"{self.fingerprint}/{self.budget}/{self.scale}"

    @property
    def num_blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def numel(self) -> int:
        """d, the number of elements covered."""
        return sum(self.block_sizes)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def block_names(self) -> tuple[tuple[str, ...], ...]:
        """The parameters each block touches (a tensor split by an int grouping appears in
        several consecutive blocks)."""
        out: list[list[str]] = [[] for _ in self.block_sizes]
        for s in self.segments:
            out[s.block].append(self.names[s.tensor_index])
        return tuple(tuple(names) for names in out)

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """``model``'s trainable parameters (then its travelling buffers) in plan order,
        after checking they match the plan (names, shapes, dtypes, one device,
        contiguous) and that every persistent float buffer is accounted for. Raises
        ValueError otherwise."""
        named = _trainable(model)
        fix = ("build the plan from this model (FerretPlan.from_model) on every peer, with the same "
               "parameters trainable, the same dtype and the same buffers= policy")
        buffers = {n: (b, keep) for n, b, keep in _float_buffers(model)}
        loose = [n for n, (_, keep) in buffers.items()
                 if keep and n not in self.buffer_names and n not in self.frozen_buffers]
        if loose:
            raise ValueError(f"the model has persistent floating-point buffers the plan does not cover ({loose[:3]}): "
                             f"{fix}")
        missing = [n for n in self.buffer_names + self.frozen_buffers if n not in buffers]
        if missing:
            raise ValueError(f"the plan names buffers the model does not have ({missing[:3]}): {fix}")
        named = named + [(n, buffers[n][0]) for n in self.buffer_names]
        if len(named) != len(self.names):
            extra = sorted({n for n, _ in named} ^ set(self.names))[:3]
            raise ValueError(f"the model has {len(named)} trainable parameters and travelling buffers but the plan "
                             f"has {len(self.names)} (differing names: {extra}): {fix}")
        device = named[0][1].device
        for i, ((n, p), name, shape, dtype) in enumerate(zip(named, self.names, self.shapes, self.dtypes, strict=True)):
            if n != name:
                raise ValueError(f"trainable parameter {i} is {n!r} but the plan has {name!r}: {fix}")
            if tuple(p.shape) != shape:
                raise ValueError(f"parameter {n!r} has shape {tuple(p.shape)} but the plan has {shape}: {fix}")
            if p.dtype != dtype:
                raise ValueError(f"parameter {n!r} has dtype {p.dtype} but the plan has {dtype}: {fix}")
            if p.device != device:
                raise ValueError(f"parameter {n!r} is on {p.device} but {named[0][0]!r} is on {device}: the "
                                 "trainable parameters must share one device (no device_map sharding)")
            if not p.is_contiguous():
                raise ValueError(f"parameter {n!r} is not contiguous: make it contiguous "
                                 "(p.data = p.data.contiguous()) before the round")
        return [p for _, p in named]

    def static_buffers(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The float buffers that must not change in a round: ``frozen_buffers`` and every
        non-persistent float buffer, in ``named_buffers`` order."""
        return [b for n, b, keep in _float_buffers(model) if not keep or n in self.frozen_buffers]

    def digest(self, model: torch.nn.Module) -> str:
        """Digest (``ferret_kernels.digest``) of ``model``'s plan tensors and frozen
        persistent buffers: what a ``GlobalUpdate``'s ``start_digest`` names. Equal on
        every peer and device that holds the same weights."""
        frozen = {n: b for n, b, keep in _float_buffers(model) if keep and n in self.frozen_buffers}
        return tensors_digest(self.parameters(model) + [frozen[n].contiguous() for n in self.frozen_buffers])

    def block_norms(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """||x_l|| per block of the vector laid out by ``tensors`` (plan order), accumulated
        in float32 per tensor piece and float64 across pieces."""
        flat = [t.detach().reshape(-1) for t in tensors]
        if [t.numel() for t in flat] != list(self.numels):
            raise ValueError(f"tensors have sizes {[t.numel() for t in flat][:4]}... but the plan's are "
                             f"{list(self.numels)[:4]}...: pass the plan's tensors in plan order")
        segments = self.segments
        pieces = torch.stack([torch.linalg.vector_norm(flat[s.tensor_index][s.start:s.start + s.n],
                                                       dtype=torch.float32) for s in segments])
        squares = pieces.double().cpu().square()
        sums = torch.zeros(self.num_blocks, dtype=torch.float64)
        sums.index_add_(0, torch.tensor([s.block for s in segments]), squares)
        return sums.sqrt().tolist()

    def counts_for(self, norms: Sequence[float], allocation: str | None = None) -> list[int]:
        """K_l per block from the blocks' update norms: sum == budget, each >= 1."""
        allocation = self.allocation if allocation is None else allocation
        if len(norms) != self.num_blocks:
            raise ValueError(f"norms has {len(norms)} entries but the plan has {self.num_blocks} blocks")
        bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
        if bad:
            raise ValueError(f"the update of block {bad[0]} ({', '.join(self.block_names[bad[0]])}) is not finite: "
                             "local training diverged; lower the learning rate or clip gradients")
        return allocate(self.budget, allocation_weights(allocation, norms, self.block_sizes))

    def check_counts(self, counts: Sequence[int], *, what: str = "counts",
                     exact_budget: bool = True) -> tuple[int, ...]:
        """``counts`` as a tuple after checking one int >= 1 per block, summing to the budget
        (or, with ``exact_budget=False``, each at most budget - L + 1, the most any client
        can give one block). Raises ValueError naming ``what``."""
        try:
            out = tuple(int(c) for c in counts)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be a sequence of ints") from exc
        if len(out) != self.num_blocks:
            raise ValueError(f"{what} has {len(out)} entries but the plan has {self.num_blocks} blocks: "
                             "client and server plans differ (grouping?)")
        if min(out) < 1:
            raise ValueError(f"{what} must all be >= 1 (every block gets a basis); block {out.index(min(out))} "
                             f"has {min(out)}")
        if exact_budget and sum(out) != self.budget:
            raise ValueError(f"{what} sum to {sum(out)} but the plan's budget is {self.budget}: client and server "
                             "must use the same budget")
        cap = self.budget - self.num_blocks + 1
        if not exact_budget and max(out) > cap:
            raise ValueError(f"{what} has a block with {max(out)} bases, more than any client can send under "
                             f"budget {self.budget} ({cap})")
        return out

    def coefficient_scale(self, counts: Sequence[int], scale: str | None = None) -> torch.Tensor:
        """float32 (sum counts,) factor per coefficient: 1 / (rho K_l) for "unbiased",
        parity_factor(d_l) / (rho K_l) for "paper"."""
        scale = self.scale if scale is None else scale
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
        rho = rng.VARIANCE[self.distribution]
        per_block = torch.tensor([(parity_factor(d) if scale == "paper" else 1.0) / (rho * k)
                                  for d, k in zip(self.block_sizes, counts, strict=True)], dtype=torch.float64)
        return per_block[coefficient_blocks(counts)].to(torch.float32)

    def client_round(self, model: torch.nn.Module, *, round: int, seed: int, **options):
        """``ClientRound(plan, model, round=..., seed=..., **options)`` (``ferret_kernels.client``);
        use as a context manager around local training:
        ``with plan.client_round(m, round=r, seed=s) as cr: ...``."""
        if _client_round_class is None:
            raise RuntimeError("ferret_kernels.client is not imported: import ferret_kernels")
        return _client_round_class(self, model, round=round, seed=seed, **options)


def coefficient_blocks(counts: Sequence[int]) -> torch.Tensor:
    """int64 (sum counts,): the block each coefficient belongs to."""
    # numpy, because torch.repeat_interleave costs ~10 ms a call on some CPU builds
    return torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int64), np.asarray(counts, dtype=np.int64)))


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _float_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, buffer, persistent) for every floating-point buffer, ``named_buffers`` order."""
    modules = dict(model.named_modules())
    out = []
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            continue
        owner, _, leaf = name.rpartition(".")
        out.append((name, b, leaf not in modules[owner]._non_persistent_buffers_set))
    return out
