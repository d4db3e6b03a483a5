"""Generation-only roofline: regenerate K basis tiles of d elements and sum them.

Reads no input and writes one float per program, with the accumulators, tiles and
warps of reconstruct, so its throughput (elements x bases per second) is the ceiling
project and reconstruct can approach.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DIST_CODE, SHAPES, CallBuffer, Launch, run, seed_words
from ._rng import gaussian4, rademacher_words, signed_by_bit, uint32_key


@triton.jit(do_not_specialize=["out_ptr", "call_ptr"])
def _generate_sum_kernel(out_ptr, call_ptr, DIST: tl.constexpr, TILE: tl.constexpr):
    # call_ptr: seed words, K, d
    key0, key1 = uint32_key(call_ptr)
    K = tl.load(call_ptr + 2)
    d = tl.load(call_ptr + 3)
    pid = tl.program_id(0).to(tl.int64)
    block = tl.zeros([], dtype=tl.uint32)
    if DIST == 0:
        call = pid * (TILE // 4) + tl.arange(0, TILE // 4)
        acc0 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc1 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc2 = tl.zeros([TILE // 4], dtype=tl.float32)
        acc3 = tl.zeros([TILE // 4], dtype=tl.float32)
        for k in range(0, K):
            z0, z1, z2, z3 = gaussian4(call, (block + k).to(tl.uint32), block, key0, key1)
            acc0 = acc0 + z0
            acc1 = acc1 + z1
            acc2 = acc2 + z2
            acc3 = acc3 + z3
        j = call * 4
        total = tl.where(j < d, acc0, 0.0) + tl.where(j + 1 < d, acc1, 0.0)
        total += tl.where(j + 2 < d, acc2, 0.0) + tl.where(j + 3 < d, acc3, 0.0)
    else:
        call = pid * (TILE // 128) + tl.arange(0, TILE // 128)
        bit = tl.arange(0, 32)
        acc0 = tl.zeros([32, TILE // 128], dtype=tl.float32)
        acc1 = tl.zeros([32, TILE // 128], dtype=tl.float32)
        acc2 = tl.zeros([32, TILE // 128], dtype=tl.float32)
        acc3 = tl.zeros([32, TILE // 128], dtype=tl.float32)
        for k in range(0, K):
            w0, w1, w2, w3 = rademacher_words(call, (block + k).to(tl.uint32), block, key0, key1)
            acc0 = acc0 + signed_by_bit(1.0, w0, bit)
            acc1 = acc1 + signed_by_bit(1.0, w1, bit)
            acc2 = acc2 + signed_by_bit(1.0, w2, bit)
            acc3 = acc3 + signed_by_bit(1.0, w3, bit)
        j = bit[:, None] + (call * 128)[None, :]
        total = tl.where(j < d, acc0, 0.0) + tl.where(j + 32 < d, acc1, 0.0)
        total += tl.where(j + 64 < d, acc2, 0.0) + tl.where(j + 96 < d, acc3, 0.0)
    tl.store(out_ptr + pid, tl.sum(total))


def prepare(seed: int, K: int, d: int, distribution: str, device) -> tuple[list[Launch], torch.Tensor]:
    """The launch (host work only) and the per-tile float32 sums it writes."""
    shape = SHAPES[distribution]
    n_tiles = (d + shape.tile - 1) // shape.tile
    out = torch.empty(n_tiles, dtype=torch.float32, device=device)
    buf = CallBuffer()
    buf.add(seed_words([seed]))
    buf.add([K, d])
    return [Launch(_generate_sum_kernel, (n_tiles,), (out, buf.to(out.device)),
                   dict(DIST=DIST_CODE[distribution], TILE=shape.tile), shape.num_warps)], out


def generate_sum(seed: int, K: int, d: int, distribution: str, device) -> float:
    launches, out = prepare(seed, K, d, distribution, device)
    run(launches)
    return float(out.double().sum())
