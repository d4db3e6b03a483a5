"""Digests of weights: which starting weights a ``GlobalUpdate`` applies to.

A digest is xxh3-128 over every tensor's index, dtype, shape and raw bytes, in order,
written ``"xxh3_128:<32 hex digits>"``. It detects accidents - an update applied twice,
onto another round's weights or onto another model - and is not a signature: anyone
can recompute it (authenticity comes from the transport, docs/security.md).

Why xxh3: the digest runs once per round on every peer, so it must cost a small
fraction of a round. ``benchmarks/bench_digest.py`` measures it on SmolLM2-135M's
weights next to the apply it guards (0.48% of it in float32) and next to blake3 and
sha256 (4x and 9x slower than xxh3-128 there). CPU tensors are read in place (no
copy). CUDA tensors stream through one pinned host buffer of ``CHUNK_BYTES``, so host
memory stays bounded; every byte crosses the bus once (538 MB at ~25 GB/s would be
~20 ms: an estimate, no GPU has measured it). Hashing on the device would avoid that
copy, but a CPU peer and a GPU peer holding the same weights must compute the same
digest, so the device would need the same xxh3; a CUDA xxh3 kernel is the way to drop
the copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

ALGORITHM = "xxh3_128"

# Host staging size for accelerator tensors: large enough that each copy runs near
# PCIe bandwidth, small enough to be negligible next to the model.
CHUNK_BYTES = 64 << 20


def _cpu_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensors_digest(tensors: Sequence[torch.Tensor]) -> str:
    """xxh3-128 digest of ``tensors`` (in order): dtype, shape and bytes of each.

    Tensors must be contiguous (plan tensors are checked to be). Device-independent:
    the same values give the same digest on CPU and CUDA.
    """
    h = xxhash.xxh3_128()
    staging = None
    for i, t in enumerate(tensors):
        t = t.detach()
        if not t.is_contiguous():
            raise ValueError(f"tensor {i} is not contiguous: digests read tensors in place")
        h.update(f"{i}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)};".encode())
        if t.numel() == 0:
            continue
        if t.device.type == "cpu":
            h.update(_cpu_bytes(t))
            continue
        raw = t.reshape(-1).view(torch.uint8)
        if staging is None:
            staging = torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=t.device.type == "cuda")
        for start in range(0, raw.numel(), staging.numel()):
            piece = raw[start:start + staging.numel()]
            staging[:piece.numel()].copy_(piece)
            h.update(_cpu_bytes(staging[:piece.numel()]))
    return f"{ALGORITHM}:{h.hexdigest()}"


def check_digest_text(value, name: str) -> str:
    """``value`` if it is a digest string in this module's format, else ValueError."""
    prefix = f"{ALGORITHM}:"
    if (not isinstance(value, str) or not value.startswith(prefix) or len(value) != len(prefix) + 32
            or any(c not in "0123456789abcdef" for c in value[len(prefix):])):
        raise ValueError(f"{name} must be '{prefix}' followed by 32 lowercase hex digits; got {str(value)[:60]!r}")
    return value
