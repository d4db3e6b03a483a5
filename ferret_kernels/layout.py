"""Ragged block layouts: which tensor elements belong to which block, and where.

A layout describes a model (or any vector) as L blocks laid end to end. Block l has
``sizes[l]`` elements, ``counts[l]`` bases, uses counter word ``block_ids[l]`` of the
RNG contract, and owns coefficients ``coef_offsets[l] : coef_offsets[l] + counts[l]``.
The vector itself may live in one tensor or in a list of tensors whose flattened
concatenation is the vector (a model's parameters, with no copy). A *segment* is the
part of one tensor that falls in one block. Every backend consumes segments.

Tables: the one format every compiled backend (C++ and Triton) reads a layout in.
``SegmentTable.table`` is int64 (S, 5) with columns ``SEGMENT_COLUMNS`` and
``block_table`` int64 (G * L, 4) with columns ``BLOCK_COLUMNS``, one group of L rows
per seed. Both are built once per layout and cached (``segment_table``,
``BlockLayout.build``), so a training loop that calls the ops every round with the same
model does the host-side layout work once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch

# Column order of the two tables; csrc/ferret_cpu.h fixes the same order for the C++
# side (tests/test_cpu_backend.py checks that they agree).
SEGMENT_COLUMNS = ("tensor", "start", "n", "block", "j0")
BLOCK_COLUMNS = ("count", "block_id", "coef_offset", "k_begin")
# Layouts and segment tables kept per process: a run uses one or two layouts (the
# plan's, plus the perturb layout of zeroth-order baselines); tests use many small ones.
LAYOUT_CACHE = 64

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + n)`` of flat tensor ``tensor_index`` are block
    ``block`` elements ``[j0, j0 + n)``."""

    tensor_index: int
    start: int
    n: int
    block: int
    j0: int


@dataclass(frozen=True)
class BlockLayout:
    sizes: tuple[int, ...]
    counts: tuple[int, ...]
    block_ids: tuple[int, ...]
    coef_offsets: tuple[int, ...]

    @property
    def total_size(self) -> int:
        return sum(self.sizes)

    @property
    def total_count(self) -> int:
        return sum(self.counts)

    @classmethod
    def build(cls, sizes: Sequence[int], counts: Sequence[int], block_ids: Sequence[int] | None = None):
        """The checked layout (cached: the same arguments give the same object)."""
        sizes = _int_tuple(sizes, "block_sizes")
        counts = _int_tuple(counts, "counts")
        ids = None if block_ids is None else _int_tuple(block_ids, "block_ids")
        return _build(cls, sizes, counts, ids)

    def shifted(self, coef_start: int) -> BlockLayout:
        """The same layout with its coefficients starting at ``coef_start`` (one seed's
        slice of a concatenated gamma)."""
        if coef_start == 0:
            return self
        return BlockLayout(self.sizes, self.counts, self.block_ids, tuple(o + coef_start for o in self.coef_offsets))

    @cached_property
    def block_rows(self) -> np.ndarray:
        """int64 (L, 4) rows of ``BLOCK_COLUMNS`` with k_begin = 0."""
        rows = np.zeros((len(self.sizes), len(BLOCK_COLUMNS)), dtype=np.int64)
        rows[:, 0] = self.counts
        rows[:, 1] = self.block_ids
        rows[:, 2] = self.coef_offsets
        rows.flags.writeable = False
        return rows

    def segments(self, numels: Sequence[int]) -> list[Segment]:
        """Cut tensors of the given flat sizes, laid end to end, at block boundaries."""
        return list(segment_table(self.sizes, tuple(int(n) for n in numels)).segments)


@lru_cache(maxsize=LAYOUT_CACHE)
def _build(cls, sizes: tuple[int, ...], counts: tuple[int, ...], block_ids: tuple[int, ...] | None) -> BlockLayout:
        if len(sizes) == 0:
            raise ValueError("block_sizes is empty: give at least one block size")
        if len(counts) != len(sizes):
            raise ValueError(f"counts has {len(counts)} entries but block_sizes has {len(sizes)}: give one count per block")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"block_sizes must all be >= 1; got {min(sizes)}")
        if any(c < 0 for c in counts):
            raise ValueError(f"counts must all be >= 0; got {min(counts)}")
        if any(c >= 2**32 for c in counts):
            raise ValueError("counts must be < 2**32 (basis index k is a 32-bit counter word)")
        if block_ids is None:
            block_ids = tuple(range(len(sizes)))
        else:
            if len(block_ids) != len(sizes):
                raise ValueError(f"block_ids has {len(block_ids)} entries but block_sizes has {len(sizes)}")
            if any(not 0 <= b < 2**32 for b in block_ids):
                raise ValueError("block_ids must be in [0, 2**32) (a 32-bit counter word)")
        offsets, acc = [], 0
        for c in counts:
            offsets.append(acc)
            acc += c
        return cls(sizes, counts, tuple(block_ids), tuple(offsets))


@dataclass(frozen=True, eq=False)
class SegmentTable:
    """Tensors of flat sizes ``numels`` cut at the boundaries of blocks ``sizes``.

    ``segments`` in order (tensor by tensor); ``table`` the same as int64 (S, 5) CPU rows
    of ``SEGMENT_COLUMNS``. ``derived`` holds what a backend computes once from them
    (device copies, launch indices), keyed by that backend.
    """

    sizes: tuple[int, ...]
    numels: tuple[int, ...]
    segments: tuple[Segment, ...]
    table: torch.Tensor
    derived: dict = field(default_factory=dict, repr=False)


@lru_cache(maxsize=LAYOUT_CACHE)
def segment_table(sizes: tuple[int, ...], numels: tuple[int, ...]) -> SegmentTable:
    """The cached cut of tensors with ``numels`` elements at block boundaries ``sizes``."""
    total = sum(numels)
    if total != sum(sizes):
        raise ValueError(
            f"the tensors hold {total} elements but block_sizes add up to {sum(sizes)}: "
            "they must describe the same vector"
        )
    out: list[Segment] = []
    block, j = 0, 0
    for t, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(numel - start, sizes[block] - j)
            out.append(Segment(t, start, take, block, j))
            start += take
            j += take
            if j == sizes[block]:
                block, j = block + 1, 0
    return _table(sizes, numels, out)


@lru_cache(maxsize=LAYOUT_CACHE)
def single_segment(numel: int, offset: int) -> SegmentTable:
    """One tensor of ``numel`` elements as elements offset .. offset + numel - 1 of a
    single block (the 1-D ops)."""
    return _table((offset + numel,), (numel,), [Segment(0, 0, numel, 0, offset)])


def _table(sizes, numels, segments: list[Segment]) -> SegmentTable:
    rows = torch.tensor([(s.tensor_index, s.start, s.n, s.block, s.j0) for s in segments], dtype=torch.int64)
    return SegmentTable(sizes, numels, tuple(segments), rows.reshape(len(segments), len(SEGMENT_COLUMNS)))


def block_table(layouts: Sequence[BlockLayout], k_begins: Sequence[Sequence[int] | None] | None = None) -> np.ndarray:
    """int64 (G * L, 4) rows of ``BLOCK_COLUMNS``: L rows per layout, in order.

    ``k_begins[g]`` (default all 0) is the first basis each block of layout g uses.
    """
    k_begins = [None] * len(layouts) if k_begins is None else k_begins
    parts = []
    for lay, first in zip(layouts, k_begins, strict=True):
        rows = lay.block_rows
        if first is not None:
            if len(first) != len(lay.sizes):
                raise ValueError(f"k_begin has {len(first)} entries but the layout has {len(lay.sizes)} blocks")
            rows = rows.copy()
            rows[:, 3] = first
        parts.append(rows)
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def _int_tuple(values, name: str) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer sequence")
        return tuple(int(v) for v in values.tolist())
    try:
        out = tuple(int(v) for v in values)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints; got {type(values).__name__}") from exc
    for v, orig in zip(out, values, strict=True):
        if isinstance(orig, float) and orig != v:
            raise TypeError(f"{name} must hold integers; got {orig!r}")
    return out


def flat_views(tensors, name: str) -> list[torch.Tensor]:
    """Flattened views of one tensor or a sequence of tensors, after checking them."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} is empty: give a tensor or a non-empty list of tensors")
    device = None
    views = []
    for i, t in enumerate(tensors):
        label = name if len(tensors) == 1 else f"{name}[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{label} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if not t.is_contiguous():
            raise ValueError(f"{label} is not contiguous: pass {label}.contiguous() (in-place ops need a contiguous tensor)")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{label} is on {t.device} but {name}[0] is on {device}: put all tensors on one device")
        views.append(t.view(-1))
    return views
