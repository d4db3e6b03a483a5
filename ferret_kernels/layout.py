"""Ragged block layouts: which tensor elements belong to which block, and where.

A layout describes a model (or any vector) as L blocks laid end to end. Block l has
``sizes[l]`` elements, ``counts[l]`` bases, uses counter word ``block_ids[l]`` of the
RNG contract, and owns coefficients ``coef_offsets[l] : coef_offsets[l] + counts[l]``.
The vector itself may live in one tensor or in a list of tensors whose flattened
concatenation is the vector (a model's parameters, with no copy). A *segment* is the
part of one tensor that falls in one block. Every backend consumes segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
        sizes = _int_tuple(sizes, "block_sizes")
        counts = _int_tuple(counts, "counts")
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
            block_ids = _int_tuple(block_ids, "block_ids")
            if len(block_ids) != len(sizes):
                raise ValueError(f"block_ids has {len(block_ids)} entries but block_sizes has {len(sizes)}")
            if any(not 0 <= b < 2**32 for b in block_ids):
                raise ValueError("block_ids must be in [0, 2**32) (a 32-bit counter word)")
        offsets, acc = [], 0
        for c in counts:
            offsets.append(acc)
            acc += c
        return cls(sizes, counts, tuple(block_ids), tuple(offsets))

    def segments(self, numels: Sequence[int]) -> list[Segment]:
        """Cut tensors of the given flat sizes, laid end to end, at block boundaries."""
        total = sum(numels)
        if total != self.total_size:
            raise ValueError(
                f"the tensors hold {total} elements but block_sizes add up to {self.total_size}: "
                "they must describe the same vector"
            )
        out: list[Segment] = []
        block, j = 0, 0
        for t, numel in enumerate(numels):
            start = 0
            while start < numel:
                take = min(numel - start, self.sizes[block] - j)
                out.append(Segment(t, start, take, block, j))
                start += take
                j += take
                if j == self.sizes[block]:
                    block, j = block + 1, 0
        return out


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
