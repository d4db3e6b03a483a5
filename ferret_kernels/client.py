"""Client side of a Ferret round: snapshot, train, compress to K coefficients.

A round on a client::

    with plan.client_round(model, round=r, seed=s) as cr:   # snapshot of w_start
        ...any local training that updates model's parameters in place...
    update = cr.update                                       # ClientUpdate, K float32 numbers

``compress`` forms delta = w_start - w_end in the model's dtype, picks the per-block
counts K_l (sum == budget, default K_l ~ ||delta_l||), projects delta onto bases
k = 0..K_l-1 of block l under ``seed`` in ONE ``project_blocks`` launch over the whole
parameter list, and scales block l by 1/(rho K_l) (``scale="unbiased"``) so that the
server's rebuild V^T gamma is an unbiased estimate of delta.

Memory: besides the model, the round holds one snapshot (d elements in the model's
dtype, on the model's device or on ``snapshot_device``). ``compress`` writes delta into
storage that already exists - the parameters themselves when ``restore=True`` (they
are then overwritten with the exact snapshot), the snapshot otherwise - so it never
holds a second d-sized copy; a CPU snapshot costs one temporary the size of the
largest tensor on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import functional, rng
from .plan import ALLOCATIONS, SCALES, FerretPlan


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

    @property
    def budget(self) -> int:
        return sum(self.counts)

    def check(self, plan: FerretPlan, *, round: int | None = None) -> None:
        """Raise ValueError, naming the field and the fix, unless this update fits ``plan``
        (and ``round`` when given)."""
        check_fingerprint(self.fingerprint, plan, "ClientUpdate")
        check_round(self.round, round, "ClientUpdate")
        check_uint(self.seed, "ClientUpdate.seed", 2**64)
        check_uint(self.num_samples, "ClientUpdate.num_samples", 2**63, low=1)
        if self.scale not in SCALES:
            raise ValueError(f"ClientUpdate.scale is {self.scale!r}; expected one of {SCALES}")
        if self.scale != plan.scale:
            raise ValueError(f"ClientUpdate.scale is {self.scale!r} but the plan's is {plan.scale!r}: give client and "
                             "server plans the same scale=")
        counts = plan.check_counts(self.counts, what="ClientUpdate.counts")
        check_coefficients(self.coefficients, sum(counts), "ClientUpdate.coefficients")


def check_fingerprint(fingerprint, plan: FerretPlan, what: str) -> None:
    if fingerprint != plan.fingerprint:
        raise ValueError(
            f"{what}.fingerprint {str(fingerprint)[:16]}... does not match the plan's {plan.fingerprint[:16]}...: "
            "client and server must build the plan from the same model (parameter names, shapes, dtypes, which are "
            f"trainable), grouping and distribution, with the same RNG contract (v{rng.CONTRACT_VERSION})"
        )


def check_round(value, expected: int | None, what: str) -> None:
    check_uint(value, f"{what}.round", 2**63)
    if expected is not None and value != expected:
        raise ValueError(f"{what}.round is {value} but round {expected} was expected: it belongs to another round's "
                         "weights; drop it, or resend it for the current round")


def check_uint(value, name: str, high: int, *, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ValueError(f"{name} must be an int in [{low}, {high}); got {value!r}")


def check_coefficients(coefficients, length: int, name: str) -> None:
    if not isinstance(coefficients, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(coefficients).__name__}")
    if coefficients.dtype != torch.float32 or coefficients.dim() != 1:
        raise ValueError(f"{name} must be a 1-D float32 tensor; got {coefficients.dtype} of shape "
                         f"{tuple(coefficients.shape)}")
    if coefficients.numel() != length:
        raise ValueError(f"{name} has {coefficients.numel()} values but the counts add up to {length}")
    if not bool(torch.isfinite(coefficients).all()):
        bad = int((~torch.isfinite(coefficients)).nonzero()[0, 0])
        raise ValueError(f"{name}[{bad}] is {float(coefficients[bad])}: coefficients must be finite (a client whose "
                         "training diverged must not send)")


class ClientRound:
    """One client round over ``model``: ``begin`` snapshots, ``compress`` produces the update.

    round, seed: the round number and the uint64 seed the server announced for it.
    num_samples: local examples (server weighting by sample count). snapshot_device:
    where the snapshot lives (default: with the parameters; "cpu" saves accelerator
    memory). restore: after ``compress`` put the model back to w_start exactly, ready for
    the round's ``GlobalUpdate`` (default); False leaves the locally trained weights, and
    delta is then formed and projected where the snapshot lives. allocation, backend:
    override the plan's (the scale is always the plan's). counts: fixed K_l instead of
    an allocation (must sum to the budget).
    """

    def __init__(self, plan: FerretPlan, model: torch.nn.Module, *, round: int, seed: int, num_samples: int = 1,
                 snapshot_device=None, restore: bool = True, allocation: str | None = None, counts=None,
                 backend: str | None = None):
        if not isinstance(plan, FerretPlan):
            raise TypeError(f"plan must be a FerretPlan; got {type(plan).__name__}")
        check_round(round, None, "ClientRound")
        self.plan = plan
        self.model = model
        self.round = round
        self.seed = rng.check_seed(seed)
        check_uint(num_samples, "num_samples", 2**63, low=1)
        self.num_samples = num_samples
        self.snapshot_device = None if snapshot_device is None else torch.device(snapshot_device)
        self.restore = bool(restore)
        self.allocation = plan.allocation if allocation is None else allocation
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {self.allocation!r}")
        self.counts = None if counts is None else plan.check_counts(counts)
        self.backend = plan.backend if backend is None else backend
        self.update: ClientUpdate | None = None
        self._params: list[torch.Tensor] | None = None
        self._snapshot: list[torch.Tensor] | None = None

    def begin(self) -> ClientRound:
        """Snapshot the trainable parameters (model dtype) before local training."""
        params = self.plan.parameters(self.model)
        device = self.snapshot_device or params[0].device
        with torch.no_grad():
            self._snapshot = [p.detach().to(device=device, copy=True) for p in params]
        self._params = params
        self.update = None
        return self

    def discard(self) -> None:
        """Drop the snapshot without compressing (the model keeps its current weights)."""
        self._snapshot = self._params = None

    def compress(self, *, num_samples: int | None = None) -> ClientUpdate:
        """delta = w_start - w_end -> ClientUpdate (coefficients float32 on the CPU).

        One ``project_blocks`` launch. Consumes the snapshot; with ``restore`` the model
        holds w_start again afterwards (also when compressing fails).
        """
        if self._snapshot is None:
            raise RuntimeError("no snapshot: call begin() (or enter the context) before training, then compress() "
                               "once")
        samples = self.num_samples if num_samples is None else num_samples
        check_uint(samples, "num_samples", 2**63, low=1)
        plan, params, snapshot = self.plan, self._params, self._snapshot
        self._snapshot = self._params = None
        with torch.no_grad():
            live = [p.detach() for p in params]
            try:
                if self.restore:
                    for p, s in zip(live, snapshot, strict=True):
                        torch.sub(s.to(p.device), p, out=p)
                    delta = live
                else:
                    for p, s in zip(live, snapshot, strict=True):
                        s.sub_(p.to(s.device))
                    delta = snapshot
                counts = self.counts or tuple(plan.counts_for(plan.block_norms(delta), self.allocation))
                gamma = functional.project_blocks(delta, plan.block_sizes, counts, self.seed,
                                                  distribution=plan.distribution, backend=self.backend)
            finally:
                if self.restore:
                    for p, s in zip(live, snapshot, strict=True):
                        p.copy_(s)
                # free the snapshot (or the delta held in it) before returning
                snapshot.clear()
        gamma = gamma.cpu() * plan.coefficient_scale(counts)
        check_coefficients(gamma, sum(counts), "coefficients")
        self.update = ClientUpdate(self.round, self.seed, tuple(counts), gamma, samples, plan.fingerprint, plan.scale)
        return self.update

    def __enter__(self) -> ClientRound:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.compress()
        else:
            self.discard()

