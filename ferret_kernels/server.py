"""Server side of a Ferret round: merge client coefficients, rebuild into the weights.

The server never materialises an update. Updates that share a round seed use the same
bases (block l of client i uses the prefix k = 0..K_{i,l}-1), so they merge coefficient
by coefficient: gamma_l = sum_i w_i gamma_{i,l}, zero-padded to max_i K_{i,l}. Then

    w <- w - server_lr * sum_g V_g^T gamma_g

in one ``reconstruct_blocks_`` launch over all distinct seeds g (each element sums its
seeds' terms in float32 and is written once), straight into the parameters
(alpha = -server_lr): the cost depends on the number of distinct seeds, not of clients.
The merged coefficients form a ``GlobalUpdate``; any client holding the round's
starting weights replays it through the same code and gets the server's new weights bit
for bit (the kernels accumulate in a fixed order on every backend).

Options: weighting by sample count or equal; a seed schedule (a fresh seed per round or
one fixed seed); heavy-ball momentum on the merged coefficients (fixed seed only, since
coefficients of different seeds multiply different bases); per-block clipping of the
rebuilt update (see ``CLIP_MODES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import backends, functional, rng
from .client import ClientUpdate, check_coefficients, check_fingerprint, check_round, check_uint
from .plan import SEED_SCHEDULES, FerretPlan, coefficient_blocks, round_seed

WEIGHTINGS = ("samples", "equal")

# How clipping measures block l of the rebuilt update u_l = sum_g V_{g,l}^T gamma_{g,l}:
#   "block":       ||u_l|| estimated as sqrt(rho d_l sum_g ||gamma_{g,l}||^2), which is its
#                  expectation over the bases (rows of V are nearly orthogonal with squared
#                  norm ~ rho d_l); relative error ~ sqrt(K_l / d_l). No extra pass.
#   "block_exact": rebuild each block into a temporary of d_l elements and take its norm;
#                  one extra reconstruct per (seed, block), i.e. about one more full pass.
#   "piece":       the reference code's rule: every single piece gamma_k v_k is clipped,
#                  with ||v_k|| estimated as sqrt(rho d_l).
# The clipped block is scaled as a whole (all its coefficients by one factor), so clipping
# is a change of coefficients and the GlobalUpdate still replays bit for bit.
CLIP_MODES = ("block", "block_exact", "piece")

WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class GlobalUpdate:
    """What the server applied in a round, enough for a client to replay it.

    round: the round whose starting weights it applies to. seeds: the distinct uint64
    seeds, in application order. counts[g]: K_l per block for seed g (bases k = 0..K_l-1
    of RNG block l). coefficients[g]: float32 CPU (sum counts[g],), block l's at
    sum_{m<l} counts[g][m], after weighting, momentum and clipping. server_lr: the
    step, w <- w - server_lr * sum_g V_g^T coefficients[g]. fingerprint: the plan's.
    plan: the plan it was made or decoded with (not sent; ``apply_`` uses it).
    """

    round: int
    seeds: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    coefficients: tuple[torch.Tensor, ...]
    server_lr: float
    fingerprint: str
    plan: FerretPlan | None = field(default=None, repr=False)

    def check(self, plan: FerretPlan, *, round: int | None = None) -> None:
        """Raise ValueError, naming the field and the fix, unless this fits ``plan``."""
        check_fingerprint(self.fingerprint, plan, "GlobalUpdate")
        check_round(self.round, round, "GlobalUpdate")
        if not isinstance(self.server_lr, float) or not math.isfinite(self.server_lr):
            raise ValueError(f"GlobalUpdate.server_lr must be a finite float; got {self.server_lr!r}")
        if not len(self.seeds) == len(self.counts) == len(self.coefficients) >= 1:
            raise ValueError(f"GlobalUpdate has {len(self.seeds)} seeds, {len(self.counts)} count lists and "
                             f"{len(self.coefficients)} coefficient tensors: give one of each per seed (at least one)")
        for g, seed in enumerate(self.seeds):
            check_uint(seed, f"GlobalUpdate.seeds[{g}]", 2**64)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("GlobalUpdate.seeds repeats a seed: merge the coefficients of one seed into one entry")
        for g, (counts, coefficients) in enumerate(zip(self.counts, self.coefficients, strict=True)):
            counts = plan.check_counts(counts, what=f"GlobalUpdate.counts[{g}]", exact_budget=False)
            check_coefficients(coefficients, sum(counts), f"GlobalUpdate.coefficients[{g}]")

    def apply_(self, model: torch.nn.Module, *, plan: FerretPlan | None = None, round: int | None = None,
               backend: str | None = None) -> torch.nn.Module:
        """w <- w - server_lr * sum_g V_g^T gamma_g in place, one launch for all seeds.

        Everything is checked before the first write (plan, model, coefficients,
        backend), so a refused update leaves the model untouched.
        """
        plan = self.plan if plan is None else plan
        if plan is None:
            raise ValueError("this GlobalUpdate carries no plan: pass plan= (the FerretPlan both sides built)")
        self.check(plan, round=round)
        params = plan.parameters(model)
        device = params[0].device
        name = backends.resolve(plan.backend if backend is None else backend, device)
        backends.module(name)
        coefficients = [c.to(device) for c in self.coefficients]
        with torch.no_grad():
            live = [p.detach() for p in params]
            functional.reconstruct_blocks_(live, plan.block_sizes, [list(c) for c in self.counts],
                                           torch.cat(coefficients), list(self.seeds), alpha=-self.server_lr,
                                           distribution=plan.distribution, backend=name)
        return model


def _starts(counts) -> torch.Tensor:
    c = torch.tensor(list(counts), dtype=torch.int64)
    return torch.cumsum(c, 0) - c


def _prefix_index(counts_from, counts_to) -> torch.Tensor:
    """Position in the ``counts_to`` layout of each coefficient of the ``counts_from``
    layout (block by block, a prefix: counts_from[l] <= counts_to[l])."""
    blocks = coefficient_blocks(counts_from)
    return torch.arange(sum(counts_from)) - _starts(counts_from)[blocks] + _starts(counts_to)[blocks]


class Aggregator:
    """Collects a round's ``ClientUpdate``s and turns them into a ``GlobalUpdate``.

    round: the round being collected (advances after each ``aggregate``/``apply_``).
    base_seed, seed_schedule: ``seed`` is ``round_seed(base_seed, round, seed_schedule)``,
    the seed to announce to the round's clients ("per_round" or "fixed"). weighting:
    "samples" (w_i ~ num_samples) or "equal"; weights are normalised to sum to 1.
    server_lr: the step applied to the merged update. momentum: beta of
    m <- beta m + gamma, applying m (needs seed_schedule="fixed"). clip_norm, clip:
    bound on each block of the rebuilt merged update and how it is measured
    (``CLIP_MODES``). wire_dtype: the dtype the GlobalUpdate will travel in; coefficients
    are rounded to it before the server applies them, so clients replay bit for bit.
    backend: override the plan's.
    """

    def __init__(self, plan: FerretPlan, *, round: int = 0, base_seed: int = 0, seed_schedule: str = "per_round",
                 weighting: str = "samples", server_lr: float = 1.0, momentum: float = 0.0,
                 clip_norm: float | None = None, clip: str = "block", wire_dtype: torch.dtype = torch.float32,
                 backend: str | None = None):
        if not isinstance(plan, FerretPlan):
            raise TypeError(f"plan must be a FerretPlan; got {type(plan).__name__}")
        check_round(round, None, "Aggregator")
        if seed_schedule not in SEED_SCHEDULES:
            raise ValueError(f"seed_schedule must be one of {SEED_SCHEDULES}; got {seed_schedule!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        if momentum and seed_schedule != "fixed":
            raise ValueError("momentum adds coefficients across rounds, which only means something when every round "
                             "uses the same bases: use seed_schedule='fixed'")
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}; got {clip!r}")
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number or None; got {clip_norm}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}; got {wire_dtype}")
        self.plan = plan
        self.round = round
        self.base_seed = rng.check_seed(base_seed)
        self.seed_schedule = seed_schedule
        self.weighting = weighting
        self.server_lr = _check_lr(server_lr)
        self.momentum = float(momentum)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.clip = clip
        self.wire_dtype = wire_dtype
        self.backend = plan.backend if backend is None else backend
        self.last_clip_factors: list[float] | None = None
        self._pending: list[tuple[ClientUpdate, float]] = []
        self._momentum: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def seed(self) -> int:
        """The seed the clients of the current round should use."""
        return round_seed(self.base_seed, self.round, self.seed_schedule)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, update: ClientUpdate, weight: float | None = None) -> None:
        """Queue a client's update for the current round after checking it (plan
        fingerprint, round, scale, counts, finite coefficients). weight: overrides the
        weighting rule for this update (> 0; normalised with the others)."""
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"update must be a ClientUpdate; got {type(update).__name__}")
        update.check(self.plan, round=self.round)
        if self.momentum and update.seed != self.seed:
            raise ValueError(f"ClientUpdate.seed is {update.seed} but momentum needs every client on the fixed seed "
                             f"{self.seed}: give clients Aggregator.seed")
        if weight is None:
            weight = float(update.num_samples) if self.weighting == "samples" else 1.0
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight)
                                                                                      and weight > 0):
            raise ValueError(f"weight must be a positive finite number; got {weight!r}")
        self._pending.append((update, float(weight)))

    def aggregate(self, *, server_lr: float | None = None, device="cpu") -> GlobalUpdate:
        """Merge the queued updates into the round's GlobalUpdate, then start the next round.

        Does not touch any model. device: where ``clip="block_exact"`` rebuilds blocks.
        """
        if not self._pending:
            raise ValueError(f"no updates for round {self.round}: add() at least one ClientUpdate first")
        slr = self.server_lr if server_lr is None else _check_lr(server_lr)
        total = sum(w for _, w in self._pending)
        groups: dict[int, list[tuple[ClientUpdate, float]]] = {}
        for update, w in self._pending:
            groups.setdefault(update.seed, []).append((update, w / total))
        seeds = tuple(sorted(groups))
        counts_list, merged_list = [], []
        for seed in seeds:
            members = groups[seed]
            counts = tuple(max(u.counts[b] for u, _ in members) for b in range(self.plan.num_blocks))
            merged = torch.zeros(sum(counts), dtype=torch.float64)
            for u, w in members:
                merged.index_add_(0, _prefix_index(u.counts, counts), u.coefficients.double() * w)
            counts_list.append(counts)
            merged_list.append(merged)
        momentum_state = None
        if self.momentum:
            momentum_state = self._step_momentum(counts_list[0], merged_list[0])
            counts_list, merged_list = [momentum_state[0]], [momentum_state[1]]
        coefficients = [m.to(torch.float32) for m in merged_list]
        if self.clip_norm is not None:
            coefficients = self._clip(seeds, counts_list, coefficients, torch.device(device))
        wired = []
        for g, c in enumerate(coefficients):
            c = c.to(self.wire_dtype).to(torch.float32)
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"a merged coefficient of seed {seeds[g]} does not fit wire_dtype={self.wire_dtype}: "
                                 "use float32 or bfloat16, or clip (clip_norm=)")
            wired.append(c)
        update = GlobalUpdate(self.round, seeds, tuple(counts_list), tuple(wired), slr, self.plan.fingerprint,
                              self.plan)
        # state changes only once nothing can fail, so a refused round can be retried
        if momentum_state is not None:
            self._momentum = momentum_state
        self._pending = []
        self.round += 1
        return update

    def apply_(self, model: torch.nn.Module, server_lr: float | None = None) -> GlobalUpdate:
        """``aggregate`` and apply the result to ``model`` in place; returns the
        GlobalUpdate to broadcast. The model is checked against the plan first, so a
        mismatch raises before anything is consumed or written."""
        params = self.plan.parameters(model)
        backends.module(backends.resolve(self.backend, params[0].device))
        update = self.aggregate(server_lr=server_lr, device=params[0].device)
        update.apply_(model, backend=self.backend)
        return update

    def reset_momentum(self) -> None:
        self._momentum = None

    def _step_momentum(self, counts, merged) -> tuple[tuple[int, ...], torch.Tensor]:
        """The next (counts, m) of m <- beta m + merged, both zero-padded to the larger
        count per block (bases are prefixes of one fixed seed, so padding is exact)."""
        if self._momentum is None:
            return counts, merged
        old_counts, old = self._momentum
        new_counts = tuple(max(a, b) for a, b in zip(old_counts, counts, strict=True))
        m = torch.zeros(sum(new_counts), dtype=torch.float64)
        m.index_add_(0, _prefix_index(old_counts, new_counts), old * self.momentum)
        m.index_add_(0, _prefix_index(counts, new_counts), merged)
        return new_counts, m

    def _clip(self, seeds, counts_list, coefficients, device) -> list[torch.Tensor]:
        plan, tau = self.plan, self.clip_norm
        rho = rng.VARIANCE[plan.distribution]
        L = plan.num_blocks
        if self.clip == "piece":
            basis_norm = (torch.tensor(plan.block_sizes, dtype=torch.float64) * rho).sqrt()
            out = []
            for counts, c in zip(counts_list, coefficients, strict=True):
                piece_norm = c.double().abs() * basis_norm[coefficient_blocks(counts)]
                factor = torch.where(piece_norm > tau, tau / piece_norm, torch.ones_like(piece_norm))
                out.append((c.double() * factor).to(torch.float32))
            self.last_clip_factors = None
            return out
        if self.clip == "block":
            squares = torch.zeros(L, dtype=torch.float64)
            for counts, c in zip(counts_list, coefficients, strict=True):
                squares.index_add_(0, coefficient_blocks(counts), c.double().square())
            norms = (squares * rho * torch.tensor(plan.block_sizes, dtype=torch.float64)).sqrt()
        else:
            norms = torch.zeros(L, dtype=torch.float64)
            buffer = torch.empty(max(plan.block_sizes), dtype=torch.float32, device=device)
            name = backends.resolve(self.backend, device)
            for b, size in enumerate(plan.block_sizes):
                tmp = buffer[:size].zero_()
                for seed, counts, c in zip(seeds, counts_list, coefficients, strict=True):
                    start = sum(counts[:b])
                    gamma = c[start:start + counts[b]].to(device)
                    functional.reconstruct_blocks_(tmp, [size], [counts[b]], gamma, seed, block_ids=[b],
                                                   distribution=plan.distribution, backend=name)
                norms[b] = float(torch.linalg.vector_norm(tmp, dtype=torch.float64))
        factors = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        self.last_clip_factors = factors.tolist()
        return [(c.double() * factors[coefficient_blocks(counts)]).to(torch.float32)
                for counts, c in zip(counts_list, coefficients, strict=True)]


def _check_lr(server_lr) -> float:
    if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not math.isfinite(server_lr):
        raise ValueError(f"server_lr must be a finite number; got {server_lr!r}")
    return float(server_lr)
