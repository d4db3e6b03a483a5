"""Wire format: ClientUpdate and GlobalUpdate to and from bytes.

A message is a safetensors blob (an 8-byte little-endian header length, a JSON header,
raw little-endian tensor data; never pickle), readable by ``safetensors.torch.load``.
This module writes it itself so that the bytes are canonical: the header is JSON with
sorted keys and no spaces, padded with spaces to a multiple of 8, tensors laid out in
name order. The same content gives the same bytes in every process (no dependence on
the hash seed), and a decoder refuses any header that is not canonical.

The header's ``__metadata__`` holds strings:

    format        "ferret-client-update" | "ferret-global-update"
    version       "2" (this layout)
    contract      RNG contract version (docs/rng.md)
    fingerprint   the plan's sha256
    round         decimal
    seed          decimal uint64 (client)        seeds         comma-separated (global)
    num_samples   decimal (client)               server_lr     Python repr of the float (global)
    scale         "unbiased" | "paper" (client)  start_digest  "" or "xxh3_128:<hex>" (global)
    digest        sha256 over the other metadata and every tensor's dtype, shape and bytes

and the tensors are

    coefficients  float32, float16 or bfloat16 (sum of counts,); decoded to float32
    counts        int16 (L,) client / (G, L) global; int32 when a count exceeds 32767

The digest catches corruption (it is not authentication: anyone can recompute it; see
docs/security.md). ``len(encode_...(...))`` is the exact size on the wire.

Decoding checks the cheap things first - size, header length, canonical JSON, keys,
format, version, contract, fingerprint, round, tensor dtypes, shapes and offsets, the
counts - so a hostile message is refused before anything costs more than reading its
header; then the digest, then finite values. Every refusal raises ``MessageError`` (a
``ValueError``) with a ``reason`` and a text naming the field and the fix; nothing else
escapes for any byte string. Decoding never touches a model. A decoded message is
marked as checked against the plan, so ``Aggregator.add`` and ``apply_`` do not check
it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import torch

from . import rng
from .digest import check_digest_text
from .messages import (
    WIRE_DTYPE_NAMES,
    WIRE_DTYPE_TABLE,
    ClientUpdate,
    GlobalUpdate,
    MessageError,
    check_coefficients,
    check_counts,
    check_fingerprint,
    check_round,
    check_scale,
    check_server_lr,
    check_uint,
    wire_dtype,
)
from .plan import FerretPlan

WIRE_VERSION = "2"
CLIENT_FORMAT = "ferret-client-update"
GLOBAL_FORMAT = "ferret-global-update"

# Names a caller may give for a coefficient dtype (the app's config uses them).
DTYPES = dict(WIRE_DTYPE_NAMES)

# safetensors dtype codes: the coefficient ones come from messages.WIRE_DTYPE_TABLE; the
# rest exist so that tests and the fuzzer can write (and the decoder refuse) any tensor.
_COEF_CODES = {code: dtype for _, dtype, code in WIRE_DTYPE_TABLE}
_COUNT_CODES = {"I16": torch.int16, "I32": torch.int32}
_ST_CODES = {**_COEF_CODES, **_COUNT_CODES, "F64": torch.float64, "I64": torch.int64, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
_CODE_OF = {dtype: code for code, dtype in _ST_CODES.items()}

# Far above any real header (about 500 bytes, plus 21 bytes per seed of a GlobalUpdate:
# 2**20 bytes hold ~50,000 seeds); bounds the JSON parse of a hostile length field.
MAX_HEADER = 1 << 20

# Largest tensor dimension a header may declare (counts and budgets are int32).
MAX_DIM = 2**31 - 1

_UINT = re.compile(r"(0|[1-9][0-9]{0,19})")
_KEYS = {
    CLIENT_FORMAT: {"format", "version", "contract", "fingerprint", "round", "seed", "num_samples", "scale", "digest"},
    GLOBAL_FORMAT: {"format", "version", "contract", "fingerprint", "round", "seeds", "server_lr", "start_digest",
                    "digest"},
}
_TENSORS = ("coefficients", "counts")


def _wire_dtype(dtype) -> torch.dtype:
    return wire_dtype(dtype)


def _counts_tensor(counts) -> torch.Tensor:
    t = torch.tensor(counts, dtype=torch.int64)
    return t.to(torch.int16 if int(t.max()) <= 32767 else torch.int32)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in metadata.items() if k != "digest"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(_raw(t))
    return h.hexdigest()


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return text + b" " * (-len(text) % 8)


def _serialize(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes in canonical form (sorted keys, tensors in name order)."""
    header: dict = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = _raw(t)
        header[name] = {"dtype": _CODE_OF[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = _header_bytes(header)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def _pack(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    metadata = dict(metadata, digest="")
    metadata["digest"] = _digest(metadata, tensors)
    return _serialize(metadata, tensors)


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
        "start_digest": update.start_digest or "",
    }
    coefficients = torch.cat([c.detach().cpu() for c in update.coefficients])
    tensors = {"counts": _counts_tensor([list(c) for c in update.counts]),
               "coefficients": _coefficients_for_wire(coefficients, dtype, "GlobalUpdate.coefficients", True)}
    return _pack(metadata, tensors)


def _refuse(message: str, reason: str):
    return MessageError(message, reason=reason)


def _parse_uint(metadata: dict[str, str], key: str, what: str) -> int:
    value = metadata[key]
    if not _UINT.fullmatch(value):
        raise _refuse(f"{what}.{key} is {value[:40]!r}, not a decimal integer: the message is corrupted", "field")
    return int(value)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _small_int(text: str) -> int:
    # a header's integers are sizes and offsets; refusing long digit runs keeps a hostile
    # header from making int() quadratic (Python < 3.11 has no digit limit)
    if len(text) > 20:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _read_header(data: bytes, what: str) -> tuple[int, dict]:
    if len(data) < 8:
        raise _refuse(f"the {what} message is {len(data)} bytes, too short to hold a header: it was truncated",
                      "truncated")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER:
        raise _refuse(f"the {what} message announces a {n}-byte header, more than {MAX_HEADER}: it is corrupted or "
                      "not a Ferret message", "header")
    if n > len(data) - 8:
        raise _refuse(f"the {what} message announces a {n}-byte header but holds {len(data) - 8} bytes after the "
                      "length field: it was truncated or corrupted; ask for it again", "truncated")
    text = data[8:8 + n]
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constants, parse_int=_small_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(f"the {what} message header is not valid JSON ({str(exc)[:80]}): it is corrupted; ask for it "
                      "again", "header") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _refuse(f"the {what} message has no metadata: it is not a Ferret message, or it is corrupted", "header")
    return n, header


def _check_metadata(metadata: dict, expected: str, what: str) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _refuse(f"the {what} metadata must map strings to strings: the message is corrupted", "header")
    fmt = metadata.get("format")
    if fmt != expected:
        if fmt in _KEYS:
            other = "decode_global_update" if fmt == GLOBAL_FORMAT else "decode_client_update"
            raise _refuse(f"format is {fmt!r}, not {expected!r}: decode this message with {other}", "format")
        raise _refuse(f"format is {str(fmt)[:40]!r}, not {expected!r}: this is not a Ferret {what} message", "format")
    if metadata.get("version") != WIRE_VERSION:
        raise _refuse(f"{what} wire version is {str(metadata.get('version'))[:20]!r} but this ferret_kernels reads "
                      f"{WIRE_VERSION!r}: run the same ferret_kernels version on client and server", "format")
    if metadata.get("contract") != str(rng.CONTRACT_VERSION):
        raise _refuse(f"{what} was made with RNG contract {str(metadata.get('contract'))[:20]!r} but this "
                      f"ferret_kernels implements {rng.CONTRACT_VERSION}: its bases differ; upgrade the older peer",
                      "format")
    if set(metadata) != _KEYS[expected]:
        missing = sorted(_KEYS[expected] - set(metadata))
        extra = sorted(set(metadata) - _KEYS[expected])[:5]
        raise _refuse(f"{what} metadata fields differ from wire version {WIRE_VERSION} (missing {missing}, "
                      f"unexpected {extra}): the message is corrupted or from another version", "header")


def _tensor_entry(header: dict, name: str, codes: dict, dims: int, what: str, dtype_text: str):
    """(dtype, shape, start, end) of tensor ``name`` after checking the entry's form."""
    entry = header[name]
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(f"the {what} tensor index entry {name!r} is malformed: the message is corrupted", "header")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(x) is int and 0 <= x <= MAX_DIM for x in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
        raise _refuse(f"the {what} tensor index entry {name!r} has malformed shape or offsets: the message is "
                      "corrupted", "header")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in codes or len(shape) != dims:
        raise _refuse(f"{what}.{name} must be a {dims}-D {dtype_text} tensor; got {str(entry['dtype'])[:10]} of shape "
                      f"{tuple(shape)[:4]}", "coefficients" if name == "coefficients" else "field")
    dtype = codes[entry["dtype"]]
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize:
        raise _refuse(f"the {what} tensor {name!r} spans {end - start} bytes but its shape {tuple(shape)[:4]} needs "
                      f"{math.prod(shape) * dtype.itemsize}: the message is corrupted", "header")
    return dtype, tuple(shape), start, end


def _unpack(data, expected: str, plan: FerretPlan, round: int | None):
    """The checks every message gets before its digest: returns (metadata, read), where
    read(entry) gives a tensor's values from the data region."""
    what = "ClientUpdate" if expected == CLIENT_FORMAT else "GlobalUpdate"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes; got {type(data).__name__}")
    data = bytes(data)
    if not isinstance(plan, FerretPlan):
        raise TypeError(f"plan must be a FerretPlan; got {type(plan).__name__}")
    n, header = _read_header(data, what)
    metadata = header.pop("__metadata__")
    _check_metadata(metadata, expected, what)
    if set(header) != set(_TENSORS):
        raise _refuse(f"{what} holds tensors {sorted(header)[:5]}; expected {list(_TENSORS)}: the message is "
                      "corrupted", "header")
    check_fingerprint(metadata["fingerprint"], plan, what)
    check_round(_parse_uint(metadata, "round", what), round, what)
    counts_entry = _tensor_entry(header, "counts", _COUNT_CODES, 1 if expected == CLIENT_FORMAT else 2, what,
                                 "int16/int32")
    coef_entry = _tensor_entry(header, "coefficients", _COEF_CODES, 1, what, "float32/float16/bfloat16")
    spans = sorted([counts_entry[2:], coef_entry[2:]])
    if spans[0][0] != 0 or spans[0][1] != spans[1][0]:
        raise _refuse(f"the {what} tensors do not tile the data region: the message is corrupted", "header")
    if len(data) != 8 + n + spans[1][1]:
        raise _refuse(f"the {what} message is {len(data)} bytes but its header describes {8 + n + spans[1][1]}: it "
                      "was truncated or has trailing bytes; ask for it again", "truncated")
    if _header_bytes(dict(header, __metadata__=metadata)) != data[8:8 + n]:
        raise _refuse(f"the {what} header is not in canonical form (sorted keys, no spaces, tensors in name order): "
                      "it was not written by ferret_kernels.wire, or it is corrupted", "header")

    def read(entry) -> torch.Tensor:
        dtype, shape, start, end = entry
        raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=8 + n + start).copy()
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    return metadata, counts_entry, coef_entry, read


def _checked(update, plan: FerretPlan):
    """Mark a decoded message as checked against ``plan`` (every check above ran once)."""
    object.__setattr__(update, "_checked", plan.message_key)
    return update


def _check_digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor], what: str) -> None:
    if metadata["digest"] != _digest(metadata, tensors):
        raise _refuse(f"the {what} digest does not match its content: the message was corrupted in transit; ask for "
                      "it again", "digest")


def decode_client_update(data, plan: FerretPlan, *, round: int | None = None) -> ClientUpdate:
    """Bytes -> ClientUpdate (coefficients float32 CPU), checked against ``plan`` and, when
    given, the expected ``round``. Raises MessageError on anything unexpected."""
    what = "ClientUpdate"
    metadata, counts_entry, coef_entry, read = _unpack(data, CLIENT_FORMAT, plan, round)
    if counts_entry[1][0] != plan.num_blocks:
        raise _refuse(f"{what}.counts has {counts_entry[1][0]} entries but the plan has {plan.num_blocks} blocks: "
                      "client and server plans differ (grouping?)", "field")
    counts_tensor = read(counts_entry)
    counts = check_counts(plan, counts_tensor.tolist(), f"{what}.counts", exact_budget=True)
    if coef_entry[1][0] != sum(counts):
        raise _refuse(f"{what}.coefficients has {coef_entry[1][0]} values but the counts add up to {sum(counts)}",
                      "coefficients")
    check_scale(metadata["scale"], plan, what)
    seed = _parse_uint(metadata, "seed", what)
    check_uint(seed, f"{what}.seed", 2**64)
    num_samples = _parse_uint(metadata, "num_samples", what)
    check_uint(num_samples, f"{what}.num_samples", 2**63, low=1)
    coefficients = read(coef_entry)
    _check_digest(metadata, {"counts": counts_tensor, "coefficients": coefficients}, what)
    update = ClientUpdate(
        round=_parse_uint(metadata, "round", what),
        seed=seed,
        counts=counts,
        coefficients=coefficients.to(torch.float32).contiguous(),
        num_samples=num_samples,
        fingerprint=metadata["fingerprint"],
        scale=metadata["scale"],
    )
    check_coefficients(update.coefficients, sum(counts), f"{what}.coefficients")
    return _checked(update, plan)


def decode_global_update(data, plan: FerretPlan, *, round: int | None = None) -> GlobalUpdate:
    """Bytes -> GlobalUpdate bound to ``plan``, checked against it and, when given, the
    expected ``round``. Raises MessageError on anything unexpected."""
    what = "GlobalUpdate"
    metadata, counts_entry, coef_entry, read = _unpack(data, GLOBAL_FORMAT, plan, round)
    seeds_text = metadata["seeds"].split(",")
    if not all(_UINT.fullmatch(s) for s in seeds_text):
        raise _refuse(f"GlobalUpdate.seeds is {metadata['seeds'][:60]!r}, not a list of decimal seeds: the message is "
                      "corrupted", "field")
    seeds = tuple(int(s) for s in seeds_text)
    for g, seed in enumerate(seeds):
        check_uint(seed, f"{what}.seeds[{g}]", 2**64)
    if len(set(seeds)) != len(seeds):
        raise _refuse(f"{what}.seeds repeats a seed: the message is corrupted", "field")
    try:
        server_lr = float(metadata["server_lr"])
    except ValueError:
        raise _refuse(f"GlobalUpdate.server_lr is {metadata['server_lr'][:40]!r}, not a number: the message is "
                      "corrupted", "field") from None
    check_server_lr(server_lr, f"{what}.server_lr")
    start_digest = metadata["start_digest"] or None
    if start_digest is not None:
        try:
            check_digest_text(start_digest, f"{what}.start_digest")
        except ValueError as exc:
            raise _refuse(str(exc), "field") from None
    if counts_entry[1] != (len(seeds), plan.num_blocks):
        raise _refuse(f"GlobalUpdate.counts has shape {counts_entry[1]} but {len(seeds)} seeds and {plan.num_blocks} "
                      f"blocks need ({len(seeds)}, {plan.num_blocks}): client and server plans differ, or the message "
                      "is corrupted", "field")
    counts_tensor = read(counts_entry)
    # vectorised: a hostile header may declare tens of thousands of seeds
    wide = counts_tensor.to(torch.int64)
    cap = plan.budget - plan.num_blocks + 1
    if int(wide.min()) < 1:
        raise _refuse(f"{what}.counts must all be >= 1 (every block gets a basis)", "field")
    if int(wide.max()) > cap:
        raise _refuse(f"{what}.counts has a block with {int(wide.max())} bases, more than any client can send under "
                      f"budget {plan.budget} ({cap})", "field")
    counts = tuple(tuple(row) for row in wide.tolist())
    sizes = wide.sum(dim=1).tolist()
    if coef_entry[1][0] != sum(sizes):
        raise _refuse(f"GlobalUpdate.coefficients has {coef_entry[1][0]} values but the counts add up to {sum(sizes)}: "
                      "the message is corrupted", "coefficients")
    coefficients = read(coef_entry)
    _check_digest(metadata, {"counts": counts_tensor, "coefficients": coefficients}, what)
    flat = coefficients.to(torch.float32).contiguous()
    # one finite check over all seeds (per seed it costs ~30 us each, and a header may
    # declare tens of thousands); the split views share this private buffer
    check_coefficients(flat, sum(sizes), f"{what}.coefficients")
    update = GlobalUpdate(
        round=_parse_uint(metadata, "round", what),
        seeds=seeds,
        counts=counts,
        coefficients=tuple(torch.split(flat, sizes)),
        server_lr=server_lr,
        fingerprint=metadata["fingerprint"],
        plan=plan,
        start_digest=start_digest,
    )
    return _checked(update, plan)
