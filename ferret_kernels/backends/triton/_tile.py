"""Tile addressing shared by the kernels: where a tile's elements are and which exist.

A tile is TILE consecutive block elements starting at ``tile_j`` (a multiple of TILE).
Positions inside it are int32 (< TILE), so per-element offsets and masks cost 32-bit
registers; only the scalar tile pointer carries the 64-bit arithmetic.
"""

import triton
import triton.language as tl


@triton.jit
def tile_span(anchor, first, j0, n, tile_j, TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the tile's element 0 and the range [lo, hi) of positions that lie in
    the segment: block elements j0 .. j0 + n - 1 stored from ``anchor + first`` on.
    The pointer is virtual: only positions in [lo, hi) are ever dereferenced.

    Data pointers are element offsets from ``anchor``, a 16-byte-aligned argument: a
    pointer loaded from memory carries no alignment the compiler can see, an offset
    from an aligned argument does. ALIGNED (the launcher checked: ``first`` and j0
    multiples of 4) rounds what is already round, so the compiler sees the tile start
    on a 4-element boundary.
    """
    lo = tl.maximum(j0 - tile_j, 0).to(tl.int32)
    hi = tl.minimum(j0 + n - tile_j, TILE).to(tl.int32)
    if ALIGNED:
        return anchor + (first + tile_j - j0) // 4 * 4, lo, hi
    else:
        return anchor + (first + tile_j - j0), lo, hi


@triton.jit
def call_tile(tile_ptr, lo, hi, CALLS: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers and mask of the (CALLS, 4) gaussian elements 4c + q of a tile.

    Aligned segments (j0 and n multiples of 4, see tile_span) have whole-call masks and
    a tile pointer aligned to 4 elements, so each lane's 4 elements move as one vector;
    others are masked element by element.
    """
    c4 = tl.arange(0, CALLS) * 4
    offs = c4[:, None] + tl.arange(0, 4)[None, :]
    if ALIGNED:
        inside = (c4 >= lo) & (c4 < hi)
        return tile_ptr + offs, tl.broadcast_to(inside[:, None], [CALLS, 4])
    else:
        return tile_ptr + offs, (offs >= lo) & (offs < hi)


@triton.jit
def bit_tile(tile_ptr, lo, hi, word, CALLS: tl.constexpr):
    """Pointers and mask of the (32, CALLS) Rademacher elements 128c + 32 word + b
    (bit b down the rows, call c along the columns, as ``_rng.signed_by_bit``)."""
    offs = (32 * word + tl.arange(0, 32))[:, None] + (tl.arange(0, CALLS) * 128)[None, :]
    return tile_ptr + offs, (offs >= lo) & (offs < hi)


@triton.jit
def lane_tile(tile_ptr, lo, hi, word, CALLS: tl.constexpr, CALLS_FIRST: tl.constexpr):
    """Pointers and mask of the Rademacher elements 128c + 32 word + 4q + r of an aligned
    segment (see tile_span), for a consumer that keeps one call per lane
    (``_rng.signed_by_lane_bit``): shape (8, 4, CALLS) indexed [q, r, c], or (CALLS, 4, 8)
    indexed [c, r, q] when CALLS_FIRST.

    The mask is constant over r and the tile pointer aligned to 4 elements, so r is one
    128-bit vector; Triton then spreads the lanes over the next axis in its order, and
    q and c tie (neither is contiguous). Triton 3.6 breaks the tie towards the leading axis,
    later versions towards the trailing one: the calls go where the running version puts
    the lanes, so each lane loads its own call's 32 elements of the word in 8 vectors and
    no Philox word has to cross lanes.
    """
    if CALLS_FIRST:
        start = ((tl.arange(0, CALLS) * 128)[:, None, None] + (tl.arange(0, 8) * 4)[None, None, :]) + 32 * word
    else:
        start = ((tl.arange(0, 8) * 4)[:, None, None] + (tl.arange(0, CALLS) * 128)[None, None, :]) + 32 * word
    inside = (start >= lo) & (start < hi)
    return tile_ptr + start + tl.arange(0, 4)[None, :, None], tl.broadcast_to(inside, [start.shape[0], 4,
                                                                                       start.shape[2]])


@triton.jit
def join4(z0, z1, z2, z3):
    """(calls, 4) tile with column q = z_q: element 4c + q in call order."""
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [z0.shape[0], 4])


@triton.jit
def split4(x):
    """The four columns of a (calls, 4) tile, the inverse of join4."""
    even, odd = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3
