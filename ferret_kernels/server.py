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

Trust boundary (docs/security.md). Every refused update raises ``MessageError`` with a
reason and is recorded in ``refusals``; the round goes on with the others.

- Bounded influence, on by default: an update whose worst-case effect on any weight,
  |server_lr| * BASIS_BOUND * max_l sum_k |gamma_{i,l,k}| at weight 1, exceeds
  ``max_step`` is refused at ``add`` (the bound is known before any write: docs/rng.md
  bounds every basis element), and one exceeding ``influence_cap`` times the round's
  median at ``aggregate``. Applying a GlobalUpdate also checks that no weight can leave
  its dtype's finite range.
- Declared sample counts are capped at ``sample_cap`` times the round's median (and at
  ``max_samples``); a ``client_id`` is counted once per round, an identical update once.
- Robust merging in projected space (``robust.AGGREGATIONS``): coordinate-wise median or
  trimmed mean of the clients' K coefficients, and ``norm_bound`` on each client's
  estimated update norm.
- Central client-level differential privacy (``dp.DifferentialPrivacy``).

The merged result does not depend on the order updates were added: they are merged in
the order of a digest of their content.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass

import torch

from . import backends, functional, rng
from . import dp as dp_module
from .digest import check_digest_text, tensors_digest
from .dp import DifferentialPrivacy
from .messages import (
    ACCUMULATOR_LIMIT,
    BASIS_BOUND,
    WIRE_DTYPES,
    ClientUpdate,
    GlobalUpdate,
    MessageError,
    block_l1,
    check_round,
    check_server_lr,
    wire_dtype,
)
from .plan import SEED_SCHEDULES, FerretPlan, allocate, coefficient_blocks, round_seed
from .robust import AGGREGATIONS, coordinate_median, trimmed_mean

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

# Default bound on how far one client's update can move any weight in a round (weight
# units, worst case over the bases). 100x the largest worst-case bound measured on honest
# SmolLM2-135M rounds (98, AdamW lr 1e-4 x 10 steps at server_lr 10; SGD settings stay
# near 1: benchmarks/bench_trust.py, docs/security.md), and far below anything that
# breaks a model's numerics. The relative cap below is the tighter default defence.
DEFAULT_MAX_STEP = 1e4

# Default cap on one update's worst-case influence as a multiple of the round's median
# (applied at aggregate, with >= 3 updates, so that the median is not the outlier's own).
# Honest clients of a round measured within 2x of each other.
DEFAULT_INFLUENCE_CAP = 10.0

# Per update, the largest BASIS_BOUND * sum |gamma| of a block admitted: far above any
# real update, and far enough below float32's range that a round's weighted sum of
# admitted updates (weights <= 1), with momentum, still accumulates finitely.
CLIENT_ACCUMULATOR_LIMIT = ACCUMULATOR_LIMIT * 2.0**-20

# Default cap on a declared sample count, as a multiple of the round's median: honest
# clients rarely differ by more; a client declaring 2**62 samples weighs as 10 medians.
DEFAULT_SAMPLE_CAP = 10.0

__all__ = ["Aggregator", "CLIP_MODES", "DEFAULT_INFLUENCE_CAP", "DEFAULT_MAX_STEP", "DEFAULT_SAMPLE_CAP",
           "GlobalUpdate", "WEIGHTINGS", "WIRE_DTYPES"]


@dataclass
class _Entry:
    update: ClientUpdate
    weight: float | None  # explicit weight from add(), else None (weighting rule)
    client_id: str | int | None
    key: str  # seed, samples, weight and a digest of the coefficients: merge order, duplicates
    scale: float  # norm-bound or DP clip factor
    l1_max: float  # max over blocks of sum_k |gamma_k|, after ``scale``


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

    Keep one per run: ``round`` advances after each ``aggregate``/``apply_``, momentum
    and the privacy ledger carry over, and ``state_dict``/``load_state_dict`` checkpoint
    them.

    round: the round being collected. base_seed, seed_schedule: ``seed`` is
    ``round_seed(base_seed, round, seed_schedule)``, the seed to announce to the round's
    clients ("per_round" or "fixed"). weighting: "samples" (w_i ~ capped num_samples) or
    "equal"; weights are normalised to sum to 1. server_lr: the step applied to the
    merged update. momentum: beta of m <- beta m + gamma, applying m (needs
    seed_schedule="fixed"). clip_norm, clip: bound on each block of the rebuilt merged
    update and how it is measured (``CLIP_MODES``). wire_dtype: the dtype the
    GlobalUpdate will travel in (a torch dtype or a ``wire.DTYPES`` name); coefficients
    are rounded to it before the server applies them, so clients replay bit for bit.
    backend: override the plan's.

    Trust options (module docstring): max_step (None: off), influence_cap (multiple of
    the round's median worst-case influence, from 3 updates on; None: off), sample_cap (multiple of the
    round's median declared count; None: off), max_samples (absolute cap; None: off),
    aggregation ("mean", "median", "trimmed_mean"), trim_fraction, norm_bound (bound on
    each client's estimated update norm ||D gamma_i||, see ``estimated_norm``; None:
    off), counts (fixed K_l every client must send; default under DP: the "size"
    allocation), dp (``DifferentialPrivacy`` or None).
    """

    def __init__(self, plan: FerretPlan, *, round: int = 0, base_seed: int = 0, seed_schedule: str = "per_round",
                 weighting: str = "samples", server_lr: float = 1.0, momentum: float = 0.0,
                 clip_norm: float | None = None, clip: str = "block", wire_dtype: torch.dtype = torch.float32,
                 backend: str | None = None, max_step: float | None = DEFAULT_MAX_STEP,
                 influence_cap: float | None = DEFAULT_INFLUENCE_CAP,
                 sample_cap: float | None = DEFAULT_SAMPLE_CAP, max_samples: int | None = None,
                 aggregation: str = "mean", trim_fraction: float = 0.1, norm_bound: float | None = None,
                 counts=None, dp: DifferentialPrivacy | None = None):
        if not isinstance(plan, FerretPlan):
            raise TypeError(f"plan must be a FerretPlan; got {type(plan).__name__}")
        _local(check_round, round, None, "Aggregator")
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
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5); got {trim_fraction}")
        for name, value in [("clip_norm", clip_norm), ("max_step", max_step), ("sample_cap", sample_cap),
                            ("norm_bound", norm_bound), ("influence_cap", influence_cap)]:
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number or None; got {value!r}")
        if sample_cap is not None and sample_cap < 1:
            raise ValueError(f"sample_cap must be >= 1 (a multiple of the median count) or None; got {sample_cap}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples must be an int >= 1 or None; got {max_samples!r}")
        if dp is not None:
            if not isinstance(dp, DifferentialPrivacy):
                raise TypeError(f"dp must be a DifferentialPrivacy or None; got {type(dp).__name__}")
            if weighting != "equal" or aggregation != "mean":
                raise ValueError("differential privacy bounds each client's share through clipping and a fixed "
                                 "denominator: use weighting='equal' and aggregation='mean' with dp=")
            dp_module.require_accountant()
            if counts is None:
                counts = allocate(plan.budget, [float(n) for n in plan.block_sizes])
        self.plan = plan
        self.round = round
        self.base_seed = rng.check_seed(base_seed)
        self.seed_schedule = seed_schedule
        self.weighting = weighting
        self.server_lr = _check_lr(server_lr)
        self.momentum = float(momentum)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.clip = clip
        self.wire_dtype = wire_dtype_of(wire_dtype)
        self.backend = plan.backend if backend is None else backend
        self.max_step = None if max_step is None else float(max_step)
        self.influence_cap = None if influence_cap is None else float(influence_cap)
        self.sample_cap = None if sample_cap is None else float(sample_cap)
        self.max_samples = max_samples
        self.aggregation = aggregation
        self.trim_fraction = float(trim_fraction)
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.counts = None if counts is None else plan.check_counts(counts, what="counts")
        self.dp = dp
        self.last_clip_factors: list[float] | None = None
        self.last_report: dict | None = None
        self.refusals: list[dict] = []
        self._pending: list[_Entry] = []
        self._momentum: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._dp_history: list[tuple[float, float]] = []
        self._noise = None
        if dp is not None:
            self._noise = torch.Generator().manual_seed(dp.noise_seed())

    @property
    def seed(self) -> int:
        """The seed the clients of the current round should use."""
        return round_seed(self.base_seed, self.round, self.seed_schedule)

    @property
    def dp_epsilon(self) -> float | None:
        """epsilon at ``dp.delta`` over the rounds aggregated so far (None without DP)."""
        return None if self.dp is None else dp_module.epsilon(self._dp_history, self.dp.delta)

    def __len__(self) -> int:
        return len(self._pending)

    def estimated_norm(self, counts, coefficients: torch.Tensor) -> float:
        """||D gamma|| with D_k = sqrt(rho d_l) for a basis of block l: the expected norm of
        the rebuilt update V^T gamma (rows of V have squared norm ~ rho d_l and are nearly
        orthogonal). The norm ``norm_bound`` and DP clipping bound."""
        return float(coefficients.double().mul(self._norm_weights(counts)).norm())

    def add(self, update: ClientUpdate, weight: float | None = None, *, client_id=None) -> None:
        """Queue a client's update for the current round, or refuse it.

        Checks, in order: the update itself (plan fingerprint, round, scale, counts,
        finite coefficients; skipped for updates already checked against this plan, as
        decoded ones are), the seed when the rule needs it shared (momentum, robust, DP),
        fixed counts, duplicates (``client_id`` once per round; an identical update once)
        and the influence bound. A refusal raises MessageError and is appended to
        ``refusals``; nothing is queued. weight: overrides the weighting rule for this
        update (> 0; normalised with the others; not capped). client_id: any str or int
        naming the client (e.g. its node id).
        """
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"update must be a ClientUpdate; got {type(update).__name__}")
        if client_id is not None and not isinstance(client_id, (str, int)):
            raise TypeError(f"client_id must be a str, an int or None; got {type(client_id).__name__}")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not (math.isfinite(weight) and weight > 0)):
            raise ValueError(f"weight must be a positive finite number; got {weight!r}")
        if weight is not None and self.dp is not None:
            raise ValueError("weight= is not allowed under differential privacy (every client weighs the same)")
        try:
            self._pending.append(self._admit(update, weight, client_id))
        except MessageError as exc:
            self.record_refusal(exc, client_id=client_id)
            raise

    def record_refusal(self, error: MessageError, *, client_id=None) -> None:
        """Log a refusal that happened before ``add`` (e.g. ``wire.decode_client_update``
        raised) in this round's ``refusals``, so that ``last_report`` lists every refused
        client with its reason. A no-op for an error already recorded (``add`` records
        its own), so one ``except MessageError`` can call it for both."""
        if not isinstance(error, MessageError):
            raise TypeError(f"error must be a MessageError; got {type(error).__name__}")
        if getattr(error, "recorded", False):
            return
        error.recorded = True
        self.refusals.append({"round": self.round, "client_id": client_id, "reason": error.reason,
                              "detail": str(error)})

    def _admit(self, update: ClientUpdate, weight, client_id) -> _Entry:
        update.check(self.plan, round=self.round)
        shared = self.momentum or self.aggregation != "mean" or self.dp is not None
        if shared and update.seed != self.seed:
            rule = "momentum" if self.momentum else "differential privacy" if self.dp else f"{self.aggregation}"
            raise MessageError(f"ClientUpdate.seed is {update.seed} but {rule} needs every client on the round's seed "
                               f"{self.seed}: give clients Aggregator.seed", reason="seed")
        if self.counts is not None and update.counts != self.counts:
            raise MessageError("ClientUpdate.counts differ from the Aggregator's fixed counts: build the client round "
                               "with counts=Aggregator.counts", reason="field")
        if client_id is not None and any(e.client_id == client_id for e in self._pending):
            raise MessageError(f"client {client_id!r} already sent an update for round {self.round}: each client counts "
                               "once per round", reason="duplicate")
        # everything the merge reads, so that equal keys mean interchangeable updates and the
        # merge order (sorted by key) does not depend on which of two equal ones came first
        key = f"{update.seed}|{update.num_samples}|{weight!r}|" + tensors_digest(
            [torch.tensor(update.counts, dtype=torch.int64), update.coefficients])
        if any(e.key == key for e in self._pending):
            raise MessageError(f"this exact update was already added in round {self.round} (client "
                               f"{client_id!r}): an update counts once", reason="duplicate")
        bound = self.dp.clip_norm if self.dp is not None else self.norm_bound
        scale = 1.0
        if bound is not None:
            norm = self.estimated_norm(update.counts, update.coefficients)
            scale = bound / norm if norm > bound else 1.0
        l1_max = float(block_l1(self.plan, update.counts, update.coefficients).max()) * scale
        entry = _Entry(update, None if weight is None else float(weight), client_id, key, scale, l1_max)
        self._check_influence(entry, self.server_lr)
        if not BASIS_BOUND[self.plan.distribution] * l1_max <= CLIENT_ACCUMULATOR_LIMIT:
            raise MessageError(f"this update's coefficients (largest per-block sum |gamma| {l1_max:.3g}) are too large "
                               "to rebuild in float32 next to other updates, whatever server_lr is: refused",
                               reason="overflow")
        return entry

    def _influence(self, entry: _Entry, server_lr: float) -> float:
        return abs(server_lr) * BASIS_BOUND[self.plan.distribution] * entry.l1_max

    def _check_influence(self, entry: _Entry, server_lr: float) -> None:
        if self.max_step is None:
            return
        influence = self._influence(entry, server_lr)
        if not influence <= self.max_step:
            raise MessageError(f"this update could move a weight by up to {influence:.3g} (|server_lr| "
                               f"{abs(server_lr):g} x basis bound {BASIS_BOUND[self.plan.distribution]:.4g} x its "
                               f"largest per-block sum |gamma|), more than max_step={self.max_step:g}: refused",
                               reason="influence")

    def aggregate(self, *, server_lr: float | None = None, device="cpu", start_digest: str | None = None) -> GlobalUpdate:
        """Merge the queued updates into the round's GlobalUpdate, then start the next round.

        Does not touch any model. device: where ``clip="block_exact"`` rebuilds blocks.
        start_digest: ``plan.digest`` of the weights the update will be applied to (the
        server's, before applying), carried by the GlobalUpdate so that ``apply_``
        refuses other weights; ``apply_`` fills it in. A server_lr above the
        Aggregator's re-checks the influence bound and refuses the updates that exceed it.
        """
        slr = self.server_lr if server_lr is None else _check_lr(server_lr)
        if start_digest is not None:
            check_digest_text(start_digest, "start_digest")
        refused = []
        if abs(slr) > abs(self.server_lr):
            for e in self._pending:
                try:
                    self._check_influence(e, slr)
                except MessageError as exc:
                    refused.append((e, exc))
        kept = [e for e in self._pending if all(e is not r for r, _ in refused)]
        if self.influence_cap is not None and len(kept) >= 3:
            median = statistics.median(self._influence(e, slr) for e in kept)
            if median > 0:
                for e in kept:
                    influence = self._influence(e, slr)
                    if influence > self.influence_cap * median:
                        refused.append((e, MessageError(
                            f"this update could move a weight by up to {influence:.3g}, more than influence_cap="
                            f"{self.influence_cap:g} times the round's median ({median:.3g}): refused",
                            reason="influence")))
        entries = sorted((e for e in self._pending if all(e is not r for r, _ in refused)), key=lambda e: e.key)
        if not entries:
            raise ValueError(f"no updates for round {self.round}: add() at least one ClientUpdate first")
        weights, capped = self._weights(entries)
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(e.update.seed, []).append(i)
        seeds = tuple(sorted(groups))
        counts_list, merged_list = [], []
        for seed in seeds:
            members = [entries[i] for i in groups[seed]]
            counts = self.counts or tuple(max(e.update.counts[b] for e in members) for b in range(self.plan.num_blocks))
            rows = torch.zeros(len(members), sum(counts), dtype=torch.float64)
            for row, e in zip(rows, members, strict=True):
                row.index_copy_(0, _prefix_index(e.update.counts, counts), e.update.coefficients.double() * e.scale)
            counts_list.append(counts)
            merged_list.append(self._merge(rows, [weights[i] for i in groups[seed]], counts))
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
                              self.plan, start_digest)
        update.check(self.plan)
        if not bool((update.accumulation_bounds() <= ACCUMULATOR_LIMIT).all()):
            raise ValueError("the merged coefficients are too large to rebuild in float32 (momentum or DP noise "
                             "accumulated past the limit): reset_momentum() or lower the noise")
        # state changes only once nothing can fail, so a refused round can be retried
        for e, exc in refused:
            self._pending.remove(e)
            self.record_refusal(exc, client_id=e.client_id)
        if momentum_state is not None:
            self._momentum = momentum_state
        if self.dp is not None:
            self._dp_history.append((self.dp.sampling_rate, self.dp.noise_multiplier))
        self.last_report = {
            "round": self.round, "accepted": len(entries), "refused": len(self.refusals),
            "refusal_reasons": dict(Counter(r["reason"] for r in self.refusals)),
            "refusals": list(self.refusals), "seeds": len(seeds), "sample_capped": capped,
            "norm_bounded": sum(e.scale < 1.0 for e in entries),
            "max_influence": max(self._influence(e, slr) * w for e, w in zip(entries, weights, strict=True)),
            "dp_epsilon": self.dp_epsilon, "dp_noise_std": None if self.dp is None else
            self.dp.noise_multiplier * self.dp.clip_norm / self.dp.expected_clients,
        }
        self._pending, self.refusals = [], []
        self.round += 1
        return update

    def apply_(self, model: torch.nn.Module, server_lr: float | None = None) -> GlobalUpdate:
        """``aggregate`` and apply the result to ``model`` in place; returns the
        GlobalUpdate to broadcast, naming ``model``'s starting weights (start_digest).
        The model is checked against the plan first, so a mismatch raises before
        anything is consumed or written."""
        params = self.plan.parameters(model)
        backends.module(backends.resolve(self.backend, params[0].device))
        start = self.plan.digest(model)
        update = self.aggregate(server_lr=server_lr, device=params[0].device, start_digest=start)
        update.apply_(model, backend=self.backend, check_start=False)
        return update

    def reset_momentum(self) -> None:
        self._momentum = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What persists across rounds, as tensors (safetensors-ready): ``round``; with
        momentum, ``momentum_counts`` (L,) and ``momentum`` (float64); under DP,
        ``dp_history`` (rounds, 2) of (sampling_rate, noise_multiplier) and
        ``dp_generator`` (the noise generator's state: keep checkpoints secret). Queued
        updates are not saved: checkpoint between rounds."""
        state = {"round": torch.tensor(self.round, dtype=torch.int64)}
        if self._momentum is not None:
            state["momentum_counts"] = torch.tensor(self._momentum[0], dtype=torch.int64)
            state["momentum"] = self._momentum[1].clone()
        if self.dp is not None:
            state["dp_history"] = torch.tensor(self._dp_history, dtype=torch.float64).reshape(-1, 2)
            state["dp_generator"] = self._noise.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict`` output (checked first: nothing changes on a bad dict)."""
        if self._pending:
            raise ValueError(f"{len(self._pending)} updates are queued: load state before the round's add() calls")
        allowed = {"round", "momentum_counts", "momentum"} | ({"dp_history", "dp_generator"} if self.dp else set())
        if not isinstance(state, dict) or "round" not in state or not set(state) <= allowed:
            raise ValueError(f"state must be a dict from Aggregator.state_dict with keys in {sorted(allowed)}; got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")

        def tensor(key, dtype, dims):
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != dims:
                raise ValueError(f"state[{key!r}] must be a {dims}-D {dtype} tensor")
            return t

        round = int(tensor("round", torch.int64, 0))
        _local(check_round, round, None, "state")
        momentum = None
        if ("momentum" in state) != ("momentum_counts" in state) or ("momentum" in state and not self.momentum):
            raise ValueError("state holds momentum but this Aggregator has momentum=0 (or only half of it)")
        if "momentum" in state:
            counts = self.plan.check_counts(tensor("momentum_counts", torch.int64, 1).tolist(),
                                            what="state['momentum_counts']", exact_budget=False)
            m = tensor("momentum", torch.float64, 1)
            if m.numel() != sum(counts) or not bool(torch.isfinite(m).all()):
                raise ValueError("state['momentum'] must hold sum(momentum_counts) finite values")
            momentum = (counts, m.clone())
        history = []
        if self.dp is not None:
            h = tensor("dp_history", torch.float64, 2)
            if h.shape[1] != 2:
                raise ValueError("state['dp_history'] must have shape (rounds, 2)")
            history = [(float(q), float(z)) for q, z in h.tolist()]
            generator = torch.Generator()
            generator.set_state(tensor("dp_generator", torch.uint8, 1))
            self._noise = generator
        self.round, self._momentum, self._dp_history = round, momentum, history

    def _weights(self, entries: list[_Entry]) -> tuple[list[float], int]:
        """Normalised weights, and how many declared sample counts were capped."""
        declared = [float(e.update.num_samples) for e in entries]
        cap = math.inf
        if self.max_samples is not None:
            cap = float(self.max_samples)
        if self.sample_cap is not None:
            cap = min(cap, self.sample_cap * statistics.median(declared))
        capped = 0
        raw = []
        for e, n in zip(entries, declared, strict=True):
            if e.weight is not None:
                raw.append(e.weight)
            elif self.weighting == "equal" or self.dp is not None:
                raw.append(1.0)
            else:
                capped += n > cap
                raw.append(min(n, cap))
        if self.dp is not None:
            return [1.0 / self.dp.expected_clients] * len(entries), 0
        total = math.fsum(raw)
        return [w / total for w in raw], capped

    def _merge(self, rows: torch.Tensor, weights: list[float], counts) -> torch.Tensor:
        if self.aggregation == "median":
            return coordinate_median(rows)
        if self.aggregation == "trimmed_mean":
            return trimmed_mean(rows, self.trim_fraction)
        merged = torch.zeros(rows.shape[1], dtype=torch.float64)
        for row, w in zip(rows, weights, strict=True):
            merged += row * w
        if self.dp is not None:
            noise = torch.randn(rows.shape[1], dtype=torch.float64, generator=self._noise)
            std = self.dp.noise_multiplier * self.dp.clip_norm
            merged += noise * std / self._norm_weights(counts) / self.dp.expected_clients
        return merged

    def _norm_weights(self, counts) -> torch.Tensor:
        rho = rng.VARIANCE[self.plan.distribution]
        per_block = (torch.tensor(self.plan.block_sizes, dtype=torch.float64) * rho).sqrt()
        return per_block[coefficient_blocks(counts)]

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
    try:
        return check_server_lr(server_lr, "server_lr")
    except MessageError as exc:
        raise ValueError(str(exc)) from None


def wire_dtype_of(dtype) -> torch.dtype:
    try:
        return wire_dtype(dtype)
    except ValueError as exc:
        raise ValueError(f"wire_dtype: {exc}") from None


def _local(check, *args) -> None:
    try:
        check(*args)
    except MessageError as exc:
        raise ValueError(str(exc)) from None
