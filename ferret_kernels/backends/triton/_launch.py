"""Launch preparation shared by the Triton kernels: constants, per-layout indices, the
per-call buffer and the one launch helper.

What a call costs on the host, and why it stays small at model scale:
  * Per layout, once (cached in ``SegmentTable.derived``): the segment table on the
    device and numpy columns derived from it (first tile, tile count, item offsets).
  * Per call: one int64 buffer holding the tensors' addresses (element offsets from
    an aligned anchor tensor of their dtype), the seed words, the block rows and the
    work rows of this call, built with numpy from those columns (no
    Python loop over segments or tiles) and copied to the device once, without a host
    sync (pinned memory, non_blocking). A kernel program finds its work row by a
    binary search over the rows' first items and derives its tile (and basis group)
    from its program id, so nothing is ever sized by the number of tiles.
Every kernel argument that varies between calls (seeds, offsets, counts, pointers) is
either in that buffer or listed in ``do_not_specialize`` and always < 2**31, so Triton
compiles each kernel variant once, never again in a later round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ...layout import SegmentTable

DIST_CODE = {"gaussian": 0, "rademacher": 1}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
ELEMENT_SIZE = (4, 2, 2)
# Elements of a gaussian Philox call: an aligned segment moves them as one vector.
CALL_ELEMENTS = 4


@dataclass(frozen=True)
class TileShape:
    """Block elements per program and warps per program."""

    tile: int
    num_warps: int


# gaussian: 256 Philox calls of 4 elements over 4 warps, two calls per lane; the
# accumulators are 8 registers a lane, so many programs stay resident.
# rademacher: 32 calls of 128 elements on one warp, one Philox call per lane and the
# lane's 128 accumulators in registers (~180-254 of them on sm_80/sm_90, no spill on
# triton 3.6 or 3.9: make gpu-audit checks). Fewer calls than lanes has every lane of a
# row repeat the row's Philox call.
SHAPES = {"gaussian": TileShape(1024, 4), "rademacher": TileShape(4096, 1)}

# Compile options of every launch. Float contraction is off: the contract's bits need
# each multiply and add rounded on its own (docs/rng.md).
COMPILE_OPTIONS = dict(enable_fp_fusion=False)


@dataclass
class Launch:
    """One kernel launch: what ``run`` passes to Triton, and what the audit compiles."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    num_warps: int

    def options(self) -> dict:
        return dict(self.constexprs, num_warps=self.num_warps, **COMPILE_OPTIONS)


def run(launches: list[Launch]) -> None:
    """Launch in order."""
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.options())


class CallBuffer:
    """The int64 values one call's kernels read, gathered into one device copy."""

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self.size = 0

    def add(self, values) -> int:
        """Append ``values``; returns their offset in the buffer (an int < 2**31)."""
        part = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
        offset = self.size
        self._parts.append(part)
        self.size += part.size
        if self.size >= 2**31:
            raise ValueError("the launch buffer passed 2**31 entries; split the call into smaller layouts")
        return offset

    def to(self, device: torch.device) -> torch.Tensor:
        host = torch.from_numpy(np.concatenate(self._parts) if self._parts else np.zeros(1, dtype=np.int64))
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)


def seed_words(seeds) -> np.ndarray:
    """(lo, hi) 32-bit words of each seed, flattened: the Philox key of docs/rng.md."""
    return np.array([(s & 0xFFFFFFFF, s >> 32) for s in seeds], dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class SegmentColumns:
    """Numpy columns of a segment table for one tile size, and its device copy."""

    tensor: np.ndarray
    start: np.ndarray
    n: np.ndarray
    block: np.ndarray
    j0: np.ndarray
    first_tile: np.ndarray
    n_tiles: np.ndarray
    block_item: np.ndarray  # first (segment, tile) item of the segment within its block
    block_items: np.ndarray  # (segment, tile) items per block
    device_table: torch.Tensor


def segment_columns(cut: SegmentTable, n_blocks: int, tile: int, device: torch.device) -> SegmentColumns:
    """Cached per (segment table, tile, device): the first call on a layout builds it."""
    key = ("triton", tile, str(device))
    cols = cut.derived.get(key)
    if cols is None:
        t = cut.table.numpy()
        tensor, start, n, block, j0 = (np.ascontiguousarray(t[:, i]) for i in range(5))
        first_tile = j0 // tile
        n_tiles = (j0 + n + tile - 1) // tile - first_tile
        block_items = np.bincount(block, weights=n_tiles, minlength=n_blocks).astype(np.int64)
        before = np.cumsum(n_tiles) - n_tiles
        block_first = np.cumsum(block_items) - block_items
        block_item = before - block_first[block]
        cols = SegmentColumns(tensor, start, n, block, j0, first_tile, n_tiles, block_item, block_items,
                              cut.table.to(device))
        cut.derived[key] = cols
    return cols


_ANCHORS: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def anchor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of ``dtype`` on ``device`` that every data address of that dtype is
    an element offset from (the kernels' ``anchor`` argument). Allocated once, so its
    address is always aligned and Triton specialises it the same way every call."""
    key = (dtype, str(device))
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.empty(64 // dtype.itemsize, dtype=dtype, device=device)
    return _ANCHORS[key]


def launch_groups(views: list[torch.Tensor], cols: SegmentColumns, vectorised: bool,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per segment its launch group ``2 * dtype code + aligned``, and per view its
    address as an element offset from the anchor of its dtype.

    A segment is aligned when its first element is 4 elements from an anchor-aligned
    address and it starts and ends on a call boundary; only the gaussian kernels
    (``vectorised``) use it. Views on the meta device have address 0 (the benchmark).
    """
    codes = np.fromiter((DTYPE_CODE[v.dtype] for v in views), dtype=np.int64, count=len(views))
    bases = np.array([anchor(dt, device).data_ptr() for dt in DTYPES], dtype=np.int64)
    address = np.fromiter((v.data_ptr() for v in views), dtype=np.int64, count=len(views)) - bases[codes]
    size = np.asarray(ELEMENT_SIZE, dtype=np.int64)[codes]
    if np.any(address % size):
        bad = int(np.flatnonzero(address % size)[0])
        raise ValueError(f"tensor {bad} is not aligned to its element size; pass a copy (.clone())")
    offsets = address // size
    seg_code = codes[cols.tensor]
    if not vectorised:
        return 2 * seg_code, offsets
    first = offsets[cols.tensor] + cols.start
    aligned = (first % CALL_ELEMENTS == 0) & (cols.j0 % CALL_ELEMENTS == 0) & (cols.n % CALL_ELEMENTS == 0)
    return 2 * seg_code + aligned, offsets


def item_starts(n_items: np.ndarray) -> np.ndarray:
    return np.cumsum(n_items) - n_items


@triton.jit
def find_row(starts_ptr, stride, n_rows, item):
    """The last row r with starts_ptr[r * stride] <= item (rows sorted by start, row 0
    starting at 0): a binary search over a few hundred to a few thousand rows."""
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.zeros([], dtype=tl.int64) + n_rows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + mid * stride) <= item
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo
