"""The public ops: check the arguments, pick a backend, run.

Seed semantics (all ops): element j of basis k of block b under ``seed`` is the pure
function of ``docs/rng.md`` (Philox4x32-10, contract version ``rng.CONTRACT_VERSION``).
A 1-D call works on block ``block`` and maps ``x.view(-1)[i]`` to element
``offset + i``; the ``*_blocks`` calls lay L blocks end to end and use bases
k = 0..K_l-1 of block ``block_ids[l]`` (default l). Scaling such as 1/(rho K) is the
caller's business: these compute raw V x and V^T gamma.

Backends (``backend=``): "auto" (Triton on CUDA, C++ on CPU when built, else torch),
"triton", "cpp" (alias "cpu") or "torch"; see ``backends``. The layout and its tables
are cached (``layout.py``), so repeated calls on one model redo no layout work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from . import backends, rng
from .layout import BlockLayout, SegmentTable, flat_views, segment_table, single_segment

TensorOrTensors = torch.Tensor | Sequence[torch.Tensor]


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}); got {value}")
    return value


def _check_distribution(distribution: str) -> str:
    if distribution not in rng.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {rng.DISTRIBUTIONS}; got {distribution!r}")
    return distribution


def _check_alpha(alpha) -> float:
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"alpha must be a real number; got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite; got {alpha}")
    return alpha


def _check_gamma(gamma, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"gamma must be a torch.Tensor; got {type(gamma).__name__}")
    if gamma.dtype != torch.float32:
        raise TypeError(f"gamma must be float32 (coefficients are accumulated in float32); got {gamma.dtype}. "
                        "Pass gamma.float()")
    if gamma.dim() != 1 or gamma.numel() != length:
        raise ValueError(f"gamma must be 1-D with {length} coefficients (one per basis); got shape {tuple(gamma.shape)}")
    if gamma.device != device:
        raise ValueError(f"gamma is on {gamma.device} but the output is on {device}: put both on one device")
    return gamma.contiguous()


def _single_block(numel: int, K: int, block: int, offset: int) -> tuple[BlockLayout, SegmentTable]:
    """A one-block layout over elements offset .. offset + numel - 1 of ``block``; its
    one segment is the whole tensor (the elements before ``offset`` belong to no tensor)."""
    _check_int(offset, "offset", 0, 2**62 - numel)
    layout = BlockLayout.build([offset + numel], [K], [block])
    return layout, single_segment(numel, offset)


def _cut(layout: BlockLayout, views: list[torch.Tensor]) -> SegmentTable:
    """The cached segment table of ``views`` laid end to end over ``layout``."""
    return segment_table(layout.sizes, tuple(v.numel() for v in views))


def _seed_layouts(block_sizes, counts: Sequence[Sequence[int]], block_ids) -> list[BlockLayout]:
    """One layout per seed, seed g's coefficients following those of seeds 0..g-1."""
    layouts, start = [], 0
    for per_seed in counts:
        lay = BlockLayout.build(block_sizes, per_seed, block_ids)
        layouts.append(lay.shifted(start))
        start += lay.total_count
    return layouts


def basis(seed: int, K: int, d: int, *, block: int = 0, offset: int = 0, k_begin: int = 0,
          distribution: str = "gaussian", device="cpu", backend: str = "auto") -> torch.Tensor:
    """Materialise V: float32 (K, d) with V[k, i] = v_{block, k_begin + k}[offset + i].

    For tests and debugging; every other op regenerates V without storing it.
    """
    seed = rng.check_seed(seed)
    _check_int(K, "K", 1, 2**32)
    _check_int(d, "d", 1, 2**62)
    _check_int(block, "block", 0, 2**32)
    _check_int(k_begin, "k_begin", 0, 2**32 - K + 1)
    _check_int(offset, "offset", 0, 2**62 - d)
    _check_distribution(distribution)
    device = torch.device(device)
    return backends.get(backend, device).basis_rows(seed, K, d, block, offset, k_begin, distribution, device)


def project(x: torch.Tensor, seed: int, K: int, *, block: int = 0, offset: int = 0,
            distribution: str = "gaussian", backend: str = "auto") -> torch.Tensor:
    """gamma[k] = sum_i v_{block,k}[offset + i] * x.view(-1)[i] for k < K.

    x: contiguous float32/bfloat16/float16, any shape. Returns float32 (K,) on x's
    device, accumulated in float32; the same bits on every call.
    """
    seed = rng.check_seed(seed)
    views = flat_views(x, "x")
    _check_int(K, "K", 1, 2**32)
    _check_int(block, "block", 0, 2**32)
    _check_distribution(distribution)
    layout, cut = _single_block(views[0].numel(), K, block, offset)
    return backends.get(backend, views[0].device).project_segments(views, cut, layout, seed, distribution)


def reconstruct_(out: torch.Tensor, gamma: torch.Tensor, seed: int, *, alpha: float = 1.0, block: int = 0,
                 offset: int = 0, distribution: str = "gaussian", backend: str = "auto") -> torch.Tensor:
    """out.view(-1)[i] += alpha * sum_k gamma[k] * v_{block,k}[offset + i], in place.

    out: contiguous float32/bfloat16/float16; gamma: float32 (K,) on out's device.
    Accumulates acc = acc + gamma[k] * v_k for k ascending in float32, then writes
    out + alpha * acc rounded to out's dtype: the same bits on every backend.
    """
    seed = rng.check_seed(seed)
    views = flat_views(out, "out")
    alpha = _check_alpha(alpha)
    _check_int(block, "block", 0, 2**32)
    _check_distribution(distribution)
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"gamma must be a torch.Tensor; got {type(gamma).__name__}")
    K = gamma.numel()
    _check_int(K, "gamma.numel() (K)", 1, 2**32)
    gamma = _check_gamma(gamma, K, views[0].device)
    layout, cut = _single_block(views[0].numel(), K, block, offset)
    backends.get(backend, views[0].device).reconstruct_seeds(views, cut, [layout], gamma, [seed], alpha, distribution)
    return out


def perturb_(out: torch.Tensor, seed: int, k: int, alpha: float, *, block: int = 0, offset: int = 0,
             distribution: str = "gaussian", backend: str = "auto") -> torch.Tensor:
    """out.view(-1)[i] += alpha * v_{block,k}[offset + i], in place (zeroth-order steps)."""
    seed = rng.check_seed(seed)
    views = flat_views(out, "out")
    alpha = _check_alpha(alpha)
    _check_int(k, "k", 0, 2**32)
    _check_int(block, "block", 0, 2**32)
    _check_distribution(distribution)
    layout, cut = _single_block(views[0].numel(), 1, block, offset)
    impl = backends.get(backend, views[0].device)
    gamma = torch.ones(1, dtype=torch.float32, device=views[0].device)
    impl.reconstruct_seeds(views, cut, [layout], gamma, [seed], alpha, distribution, [[k]])
    return out


def project_blocks(x: TensorOrTensors, block_sizes: Sequence[int], counts: Sequence[int], seed: int, *,
                   block_ids: Sequence[int] | None = None, distribution: str = "gaussian",
                   backend: str = "auto") -> torch.Tensor:
    """Project L blocks in one launch: gamma = concat_l (V_l x_l), V_l of shape (K_l, d_l).

    x: one tensor, or a list of tensors (e.g. a model's parameters) whose flattened
    concatenation is the vector; block l is its next ``block_sizes[l]`` elements and
    uses bases k = 0..counts[l]-1 of block ``block_ids[l]`` (default l). Returns float32
    (sum K_l,) with block l's coefficients at sum_{m<l} K_m.
    """
    seed = rng.check_seed(seed)
    views = flat_views(x, "x")
    _check_distribution(distribution)
    layout = BlockLayout.build(block_sizes, counts, block_ids)
    impl = backends.get(backend, views[0].device)
    return impl.project_segments(views, _cut(layout, views), layout, seed, distribution)


def reconstruct_blocks_(out: TensorOrTensors, block_sizes: Sequence[int], counts: Sequence, gamma: torch.Tensor,
                        seed: int | Sequence[int], *, alpha: float = 1.0, block_ids: Sequence[int] | None = None,
                        distribution: str = "gaussian", backend: str = "auto") -> TensorOrTensors:
    """In place over L blocks in one launch: out_l += alpha * V_l^T gamma_l.

    Layout as in ``project_blocks``; gamma float32 (sum K_l,). Same accumulation
    order and bits as ``reconstruct_`` on each block.

    Several seeds in one pass: ``seed`` a sequence of S seeds, ``counts`` S sequences of
    L counts, gamma the S coefficient vectors concatenated in seed order. Every element
    accumulates seed by seed (k ascending within each) into one float32 sum and is
    rounded once, so replaying S clients with their own seeds reads and writes the
    weights once.
    """
    views = flat_views(out, "out")
    alpha = _check_alpha(alpha)
    _check_distribution(distribution)
    if isinstance(seed, (list, tuple)):
        seeds = [rng.check_seed(s) for s in seed]
        if not seeds:
            raise ValueError("seed is an empty sequence: give at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seed repeats a seed: add the coefficients of one seed together instead")
        if len(counts) != len(seeds) or any(isinstance(c, int) for c in counts):
            raise ValueError(f"with {len(seeds)} seeds, counts must be {len(seeds)} sequences of per-block counts")
    else:
        seeds, counts = [rng.check_seed(seed)], [counts]
    layouts = _seed_layouts(block_sizes, counts, block_ids)
    gamma = _check_gamma(gamma, sum(lay.total_count for lay in layouts), views[0].device)
    impl = backends.get(backend, views[0].device)
    impl.reconstruct_seeds(views, _cut(layouts[0], views), layouts, gamma, seeds, alpha, distribution)
    return out


def perturb_blocks_(out: TensorOrTensors, block_sizes: Sequence[int], seed: int, k: int, alpha: float, *,
                    block_ids: Sequence[int] | None = None, distribution: str = "gaussian",
                    backend: str = "auto") -> TensorOrTensors:
    """out_l += alpha * v_{block_ids[l], k} for every block l, in one launch.

    The zeroth-order step of FedKSeed-style baselines: direction k of a whole model is
    basis k of every block. Layout as in ``project_blocks``.
    """
    seed = rng.check_seed(seed)
    views = flat_views(out, "out")
    alpha = _check_alpha(alpha)
    _check_int(k, "k", 0, 2**32)
    _check_distribution(distribution)
    layout = BlockLayout.build(block_sizes, [1] * len(block_sizes), block_ids)
    impl = backends.get(backend, views[0].device)
    gamma = torch.ones(layout.total_count, dtype=torch.float32, device=views[0].device)
    impl.reconstruct_seeds(views, _cut(layout, views), [layout], gamma, [seed], alpha, distribution,
                           [[k] * len(layout.sizes)])
    return out
