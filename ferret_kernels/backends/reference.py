"""The torch backend: every op built on ``rng.generate``, on any device torch runs on.

It is the executable specification the fast backends are tested against, and the
fallback where neither Triton nor the C++ extension is available. Bases are generated
on the CPU in chunks of at most CHUNK elements x K_CHUNK rows, never the whole of V.
"""

from __future__ import annotations

import torch

from .. import rng
from ..layout import BlockLayout, SegmentTable

# Elements per generated chunk: a multiple of 128 so chunks never split a Philox call,
# small enough that K_CHUNK rows of int64 Philox state stay in cache-sized pieces.
CHUNK = 1 << 14
K_CHUNK = 64


def basis_rows(seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
               device) -> torch.Tensor:
    out = torch.empty((K, d), dtype=torch.float32)
    for k0 in range(0, K, K_CHUNK):
        kc = min(K_CHUNK, K - k0)
        for i in range(0, d, CHUNK):
            n = min(CHUNK, d - i)
            out[k0:k0 + kc, i:i + n] = rng.generate(seed, block, k_begin + k0, kc, offset + i, n, distribution)
    return out.to(device)


def project_segments(views: list[torch.Tensor], cut: SegmentTable, layout: BlockLayout, seed: int,
                     distribution: str) -> torch.Tensor:
    gamma = torch.zeros(layout.total_count, dtype=torch.float32)
    for s in cut.segments:
        count = layout.counts[s.block]
        if count == 0:
            continue
        x = views[s.tensor_index][s.start:s.start + s.n].to(device="cpu", dtype=torch.float32)
        coef = layout.coef_offsets[s.block]
        for k0 in range(0, count, K_CHUNK):
            kc = min(K_CHUNK, count - k0)
            for i in range(0, s.n, CHUNK):
                n = min(CHUNK, s.n - i)
                v = rng.generate(seed, layout.block_ids[s.block], k0, kc, s.j0 + i, n, distribution)
                gamma[coef + k0:coef + k0 + kc] += v @ x[i:i + n]
    return gamma.to(views[0].device)


def reconstruct_seeds(views: list[torch.Tensor], cut: SegmentTable, layouts: list[BlockLayout],
                      gamma: torch.Tensor, seeds: list[int], alpha: float, distribution: str,
                      k_begins: list[list[int] | None] | None = None) -> None:
    """Seeds in order, k ascending within each, into one float32 accumulator per element;
    ``layouts[g].coef_offsets`` index ``gamma`` directly."""
    gamma = gamma.detach().to("cpu", torch.float32)
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    k_begins = k_begins or [None] * len(layouts)
    for s in cut.segments:
        terms = [(seed, lay, 0 if kb is None else kb[s.block])
                 for seed, lay, kb in zip(seeds, layouts, k_begins, strict=True) if lay.counts[s.block] > 0]
        if not terms:
            continue
        target = views[s.tensor_index][s.start:s.start + s.n]
        for i in range(0, s.n, CHUNK):
            n = min(CHUNK, s.n - i)
            acc = torch.zeros(n, dtype=torch.float32)
            for seed, lay, first in terms:
                count, coef = lay.counts[s.block], lay.coef_offsets[s.block]
                for k0 in range(0, count, K_CHUNK):
                    kc = min(K_CHUNK, count - k0)
                    v = rng.generate(seed, lay.block_ids[s.block], first + k0, kc, s.j0 + i, n, distribution)
                    for r in range(kc):
                        acc = acc + gamma[coef + k0 + r] * v[r]
            piece = target[i:i + n]
            updated = piece.to("cpu", torch.float32) + alpha32 * acc
            piece.copy_(rng.round_float32_to(updated, piece.dtype))


def generate_sum(seed: int, K: int, d: int, distribution: str, device) -> float:
    total = 0.0
    for k0 in range(0, K, K_CHUNK):
        kc = min(K_CHUNK, K - k0)
        for i in range(0, d, CHUNK):
            total += float(rng.generate(seed, 0, k0, kc, i, min(CHUNK, d - i), distribution).double().sum())
    return total
