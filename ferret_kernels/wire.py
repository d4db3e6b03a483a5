"""Wire format: ClientUpdate and GlobalUpdate to and from bytes.

A message is a safetensors blob (``safetensors.torch.save`` / ``load``: an 8-byte
little-endian header length, a JSON header, raw little-endian tensor data; never
pickle). The header's ``__metadata__`` holds strings:

    format       "ferret-client-update" | "ferret-global-update"
    version      "1" (this layout)
    contract     RNG contract version (docs/rng.md)
    fingerprint  the plan's sha256
    round        decimal
    seed         decimal uint64 (client)          seeds      comma-separated (global)
    num_samples  decimal (client)                 server_lr  Python repr of the float
    scale        "unbiased" | "paper" (client)
    digest       sha256 over the other metadata and every tensor's dtype, shape and bytes

and the tensors are

    counts        int16 (L,) client / (G, L) global; int32 when a count exceeds 32767
    coefficients  float32, float16 or bfloat16 (sum of counts,); decoded to float32

The digest catches corruption (it is not authentication: anyone can recompute it).
``len(encode_...(...))`` is the exact size on the wire. Decoding checks everything
(format, version, contract, digest, fingerprint against the expected plan, round,
dtypes, shapes, counts >= 1 with one per block and the budget's sum, finite values)
and raises ValueError naming the field and the fix; it never touches a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import rng
from .client import ClientUpdate, check_fingerprint, check_round
from .plan import FerretPlan
from .server import GlobalUpdate

WIRE_VERSION = "1"
CLIENT_FORMAT = "ferret-client-update"
GLOBAL_FORMAT = "ferret-global-update"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_COEF_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_COUNT_CODES = {"I16": torch.int16, "I32": torch.int32}

# Far above any real header (a few hundred bytes plus the seed list); bounds the JSON
# parse of a hostile length field.
MAX_HEADER = 1 << 24

_UINT = re.compile(r"(0|[1-9][0-9]{0,19})")
_KEYS = {
    CLIENT_FORMAT: {"format", "version", "contract", "fingerprint", "round", "seed", "num_samples", "scale", "digest"},
    GLOBAL_FORMAT: {"format", "version", "contract", "fingerprint", "round", "seeds", "server_lr", "digest"},
}


def _wire_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype; got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in _COEF_CODES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    return dtype


def _counts_tensor(counts) -> torch.Tensor:
    t = torch.tensor(counts, dtype=torch.int64)
    return t.to(torch.int16 if int(t.max()) <= 32767 else torch.int32)


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in metadata.items() if k != "digest"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pack(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    metadata = dict(metadata, digest="")
    metadata["digest"] = _digest(metadata, tensors)
    return _st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _coefficients_for_wire(coefficients: torch.Tensor, dtype: torch.dtype, what: str, exact: bool) -> torch.Tensor:
    wired = coefficients.detach().to("cpu", torch.float32).to(dtype)
    if not bool(torch.isfinite(wired).all()):
        raise ValueError(f"{what} has values that are not finite in {dtype} (|max| = "
                         f"{float(coefficients.abs().max()):.3g}): send float32 or bfloat16")
    if exact and not torch.equal(wired.to(torch.float32), coefficients.detach().cpu()):
        raise ValueError(f"{what} are not exactly representable in {dtype}, so clients would replay different weights "
                         f"than the server applied: build the Aggregator with wire_dtype={dtype}")
    return wired


def encode_client_update(update: ClientUpdate, *, dtype="fp32") -> bytes:
    """``update`` as bytes with coefficients in ``dtype`` ("fp32", "fp16", "bf16")."""
    if not isinstance(update, ClientUpdate):
        raise TypeError(f"update must be a ClientUpdate; got {type(update).__name__}")
    dtype = _wire_dtype(dtype)
    metadata = {
        "format": CLIENT_FORMAT, "version": WIRE_VERSION, "contract": str(rng.CONTRACT_VERSION),
        "fingerprint": update.fingerprint, "round": str(update.round), "seed": str(update.seed),
        "num_samples": str(update.num_samples), "scale": update.scale,
    }
    tensors = {"counts": _counts_tensor(update.counts),
               "coefficients": _coefficients_for_wire(update.coefficients, dtype, "ClientUpdate.coefficients", False)}
    return _pack(metadata, tensors)


def encode_global_update(update: GlobalUpdate, *, dtype="fp32") -> bytes:
    """``update`` as bytes with coefficients in ``dtype``. A lossy dtype is refused unless
    the coefficients are exactly representable in it (Aggregator(wire_dtype=...)), since
    the clients' replay must match what the server applied."""
    if not isinstance(update, GlobalUpdate):
        raise TypeError(f"update must be a GlobalUpdate; got {type(update).__name__}")
    dtype = _wire_dtype(dtype)
    metadata = {
        "format": GLOBAL_FORMAT, "version": WIRE_VERSION, "contract": str(rng.CONTRACT_VERSION),
        "fingerprint": update.fingerprint, "round": str(update.round),
        "seeds": ",".join(str(s) for s in update.seeds), "server_lr": repr(float(update.server_lr)),
    }
    coefficients = torch.cat([c.detach().cpu() for c in update.coefficients])
    tensors = {"counts": _counts_tensor([list(c) for c in update.counts]),
               "coefficients": _coefficients_for_wire(coefficients, dtype, "GlobalUpdate.coefficients", True)}
    return _pack(metadata, tensors)


def _parse_uint(metadata: dict[str, str], key: str, what: str) -> int:
    value = metadata[key]
    if not _UINT.fullmatch(value):
        raise ValueError(f"{what}.{key} is {value!r}, not a decimal integer: the message is corrupted")
    return int(value)


def _unpack(data, expected: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    what = "ClientUpdate" if expected == CLIENT_FORMAT else "GlobalUpdate"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes; got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise ValueError(f"the {what} message is {len(data)} bytes, too short to hold a header: it was truncated")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER):
        raise ValueError(f"the {what} message announces a {n}-byte header but holds {len(data) - 8} bytes after the "
                         "length field: it was truncated or corrupted; ask for it again")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the {what} message header is not valid JSON ({exc}): it is corrupted; ask for it "
                         "again") from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError(f"the {what} message has no metadata: it is not a Ferret message, or it is corrupted")
    metadata = header.pop("__metadata__")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"the {what} metadata must map strings to strings: the message is corrupted")
    fmt = metadata.get("format")
    if fmt != expected:
        if fmt in _KEYS:
            other = "decode_global_update" if fmt == GLOBAL_FORMAT else "decode_client_update"
            raise ValueError(f"format is {fmt!r}, not {expected!r}: decode this message with {other}")
        raise ValueError(f"format is {fmt!r}, not {expected!r}: this is not a Ferret {what} message")
    if metadata.get("version") != WIRE_VERSION:
        raise ValueError(f"{what} wire version is {metadata.get('version')!r} but this ferret_kernels reads "
                         f"{WIRE_VERSION!r}: run the same ferret_kernels version on client and server")
    if metadata.get("contract") != str(rng.CONTRACT_VERSION):
        raise ValueError(f"{what} was made with RNG contract {metadata.get('contract')!r} but this ferret_kernels "
                         f"implements {rng.CONTRACT_VERSION}: its bases differ; upgrade the older peer")
    if set(metadata) != _KEYS[expected]:
        missing = sorted(_KEYS[expected] - set(metadata))
        extra = sorted(set(metadata) - _KEYS[expected])
        raise ValueError(f"{what} metadata fields differ from wire version {WIRE_VERSION} (missing {missing}, "
                         f"unexpected {extra}): the message is corrupted or from another version")
    if set(header) != {"counts", "coefficients"}:
        raise ValueError(f"{what} holds tensors {sorted(header)}; expected ['coefficients', 'counts']: the message "
                         "is corrupted")
    try:
        end = max(int(entry["data_offsets"][1]) for entry in header.values())
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the {what} tensor index is malformed: the message is corrupted") from exc
    if len(data) != 8 + n + end:
        raise ValueError(f"the {what} message is {len(data)} bytes but its header describes {8 + n + end}: it was "
                         "truncated or has trailing bytes; ask for it again")
    try:
        tensors = _st_load(data)
    except Exception as exc:  # safetensors raises its own error type for every malformed blob
        raise ValueError(f"the {what} message does not decode as safetensors ({exc}): it is corrupted") from exc
    if metadata["digest"] != _digest(metadata, tensors):
        raise ValueError(f"the {what} digest does not match its content: the message was corrupted in transit; ask "
                         "for it again")
    return metadata, tensors


def _coefficients_from_wire(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype not in _COEF_CODES.values() or t.dim() != 1:
        raise ValueError(f"{what}.coefficients must be a 1-D float32/float16/bfloat16 tensor; got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def _counts_from_wire(t: torch.Tensor, what: str, dims: int) -> torch.Tensor:
    if t.dtype not in _COUNT_CODES.values() or t.dim() != dims:
        raise ValueError(f"{what}.counts must be a {dims}-D int16/int32 tensor; got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    return t.to(torch.int64)


def decode_client_update(data, plan: FerretPlan, *, round: int | None = None) -> ClientUpdate:
    """Bytes -> ClientUpdate (coefficients float32 CPU), checked against ``plan`` and, when
    given, the expected ``round``. Raises ValueError on anything unexpected."""
    metadata, tensors = _unpack(data, CLIENT_FORMAT)
    what = "ClientUpdate"
    check_fingerprint(metadata["fingerprint"], plan, what)
    check_round(_parse_uint(metadata, "round", what), round, what)
    counts = _counts_from_wire(tensors["counts"], what, 1)
    update = ClientUpdate(
        round=_parse_uint(metadata, "round", what),
        seed=_parse_uint(metadata, "seed", what),
        counts=tuple(counts.tolist()),
        coefficients=_coefficients_from_wire(tensors["coefficients"], what),
        num_samples=_parse_uint(metadata, "num_samples", what),
        fingerprint=metadata["fingerprint"],
        scale=metadata["scale"],
    )
    update.check(plan, round=round)
    return update


def decode_global_update(data, plan: FerretPlan, *, round: int | None = None) -> GlobalUpdate:
    """Bytes -> GlobalUpdate bound to ``plan``, checked against it and, when given, the
    expected ``round``. Raises ValueError on anything unexpected."""
    metadata, tensors = _unpack(data, GLOBAL_FORMAT)
    what = "GlobalUpdate"
    check_fingerprint(metadata["fingerprint"], plan, what)
    check_round(_parse_uint(metadata, "round", what), round, what)
    seeds_text = metadata["seeds"].split(",")
    if not all(_UINT.fullmatch(s) for s in seeds_text):
        raise ValueError(f"GlobalUpdate.seeds is {metadata['seeds'][:60]!r}, not a list of decimal seeds: the "
                         "message is corrupted")
    seeds = tuple(int(s) for s in seeds_text)
    try:
        server_lr = float(metadata["server_lr"])
    except ValueError as exc:
        raise ValueError(f"GlobalUpdate.server_lr is {metadata['server_lr']!r}, not a number: the message is "
                         "corrupted") from exc
    if not math.isfinite(server_lr):
        raise ValueError(f"GlobalUpdate.server_lr is {server_lr}: it must be finite")
    counts = _counts_from_wire(tensors["counts"], what, 2)
    if counts.shape != (len(seeds), plan.num_blocks):
        raise ValueError(f"GlobalUpdate.counts has shape {tuple(counts.shape)} but {len(seeds)} seeds and "
                         f"{plan.num_blocks} blocks need ({len(seeds)}, {plan.num_blocks}): client and server plans "
                         "differ, or the message is corrupted")
    if int(counts.min()) < 1:
        raise ValueError("GlobalUpdate.counts must all be >= 1 (every block has a basis)")
    flat = _coefficients_from_wire(tensors["coefficients"], what)
    sizes = counts.sum(dim=1).tolist()
    if flat.numel() != sum(sizes):
        raise ValueError(f"GlobalUpdate.coefficients has {flat.numel()} values but the counts add up to "
                         f"{sum(sizes)}: the message is corrupted")
    update = GlobalUpdate(
        round=_parse_uint(metadata, "round", what),
        seeds=seeds,
        counts=tuple(tuple(row) for row in counts.tolist()),
        coefficients=tuple(c.clone() for c in torch.split(flat, sizes)),
        server_lr=server_lr,
        fingerprint=metadata["fingerprint"],
        plan=plan,
    )
    update.check(plan, round=round)
    return update
