"""Fuzz the trust boundary: mutated messages through both decoders, the Aggregator and apply_.

    python tests/fuzz_messages.py [--n 100000] [--seed 0] [--json out.json]   (make fuzz)

Every message is fed to ``decode_client_update`` and ``decode_global_update``. Decoded
client updates go into a running ``Aggregator`` (default trust options), which applies
a round to a model every few dozen accepted updates; decoded global updates are applied
to a copy of the weights they claim to start from. The run fails unless:

- every refusal is a ``MessageError`` (nothing else escapes, for any byte string);
- no message takes longer than ``HANG_SECONDS`` (an alarm stops it otherwise);
- the process's peak memory grows by less than ``MEMORY_MB``;
- every model stays finite and no accepted client moves a weight by more than
  ``max_step`` (checked against the largest change of each applied round);
- a changed message is accepted only if it was re-digested (``retampered``); a mutation
  that happens to restore the original bytes counts as ``unchanged``.

Mutations (``MUTATIONS``): bit flips, byte overwrites, truncation and extension, random
bytes, crafted headers (every JSON field replaced by hostile values, canonical form and
length kept so the decoder must look inside), and re-digested tampering (valid messages
whose fields and values are changed and then re-digested, as a hostile peer would).
The summary counts outcomes per class: accepted, or refused by ``MessageError.reason``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import signal
import sys
import time
from collections import Counter

import torch

from ferret_kernels import Aggregator, FerretPlan, MessageError, wire
from ferret_kernels.messages import GlobalUpdate

HANG_SECONDS = 2.0
MEMORY_MB = 256
APPLY_EVERY = 32  # accepted client updates per aggregated round
MAX_STEP = 1.0

HOSTILE_VALUES = [-1, 0, 1, 2**31, 2**63, 2**64, 10**30, 1.5, -0.0, 1e308, float("inf"), float("nan"), "", "x",
                  "1e308", "-1", "nan", "inf", "0x10", " 1", "\u0661", "9" * 30, [], {}, None, True, [[[[[]]]]],
                  [0, 2**64], [0, -1], [1, 0], [0, 1e308]]
HOSTILE_FLOATS = [0.0, -0.0, 1e-45, 1e-38, 1.0, 65504.0, 65520.0, 3.0e38, 3.4028235e38, 1e12, -1e12,
                  float("inf"), float("-inf"), float("nan")]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def honest_messages(plan, model):
    """Valid client updates (fp32/fp16/bf16, shared and own seeds) and global updates."""
    agg = Aggregator(plan, base_seed=1)
    clients, updates = [], []
    for i, seed in enumerate([agg.seed, agg.seed, agg.seed, 77]):
        m = copy.deepcopy(model)
        with plan.client_round(m, round=0, seed=seed, num_samples=3 + i) as cr:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape) * 0.05)
        updates.append(cr.update)
        agg.add(cr.update, client_id=i)
        for dtype in ("fp32", "fp16", "bf16"):
            clients.append(wire.encode_client_update(cr.update, dtype=dtype))
    server = copy.deepcopy(model)
    g = agg.apply_(server)
    globals_ = [wire.encode_global_update(g)]
    half = Aggregator(plan, base_seed=1, wire_dtype="bf16")
    half.add(updates[0])
    globals_.append(wire.encode_global_update(half.aggregate(), dtype="bf16"))
    return clients, globals_


def split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def reassemble(header: dict, body: bytes, canonical: bool = True) -> bytes:
    text = wire._header_bytes(header) if canonical else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def flip_bits(rnd, data):
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        i = rnd.randrange(len(b))
        b[i] ^= 1 << rnd.randrange(8)
    return bytes(b)


def overwrite(rnd, data):
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        b[rnd.randrange(len(b))] = rnd.choice([0, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x7B, 0x5B, rnd.randrange(256)])
    return bytes(b)


def truncate_or_extend(rnd, data):
    if rnd.random() < 0.6:
        return data[:rnd.randrange(len(data))]
    return data + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))


def random_bytes(rnd, data):
    n = rnd.choice([0, 1, 7, 8, 9, 64, 500, 4096])
    out = bytes(rnd.randrange(256) for _ in range(n))
    if n >= 8 and rnd.random() < 0.5:
        out = rnd.choice([2**64 - 1, 2**63, 10**7, len(out) - 8]).to_bytes(8, "little") + out[8:]
    return out


def crafted_header(rnd, data):
    """Replace one header value by a hostile one (keeping canonical form and length
    field) or restructure the header; the body stays."""
    header, body = split(data)
    choice = rnd.random()
    if choice < 0.35:
        key = rnd.choice(list(header["__metadata__"]))
        header["__metadata__"][key] = str(rnd.choice(HOSTILE_VALUES))
    elif choice < 0.75:
        name = rnd.choice(["counts", "coefficients"])
        field = rnd.choice(["dtype", "shape", "data_offsets"])
        value = rnd.choice(HOSTILE_VALUES + ["F64", "I64", "U8", "BOOL", "F16", "I32", [], [1, 2, 3], [2**40]])
        if field == "shape" and rnd.random() < 0.5:
            value = rnd.choice([[], [0], [1], [10**6], [3, 4], [2**31], [2**31 - 1, 2]])
        header[name][field] = value
    elif choice < 0.85:
        depth = rnd.choice([10, 1000, 100000])
        header["__metadata__"]["format"] = "x"
        text = b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"
        return len(text).to_bytes(8, "little") + text + body
    elif choice < 0.95:
        header[rnd.choice(["extra", "__metadata__", "counts"])] = rnd.choice(HOSTILE_VALUES)
    else:
        return reassemble(header, body, canonical=False)
    try:
        return reassemble(header, body)
    except (ValueError, TypeError):
        return reassemble({"__metadata__": {}}, body)


def retampered(rnd, data):
    """Change fields or values of a valid message, then re-digest it (a hostile peer)."""
    header, body = split(data)
    meta = dict(header["__metadata__"])
    meta.pop("digest")
    n = int.from_bytes(data[:8], "little")
    tensors = {}
    for name in ("counts", "coefficients"):
        entry = header[name]
        raw = data[8 + n + entry["data_offsets"][0]:8 + n + entry["data_offsets"][1]]
        dtype = wire._ST_CODES[entry["dtype"]]
        tensors[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry["shape"]).clone()
    choice = rnd.random()
    c = tensors["coefficients"]
    if choice < 0.4:
        idx = torch.randint(0, c.numel(), (rnd.randint(1, 3),))
        c[idx] = torch.tensor(rnd.choice(HOSTILE_FLOATS), dtype=torch.float32).to(c.dtype)
    elif choice < 0.55:
        # scales around the influence bound (honest updates here sit near 0.2 of max_step)
        factor = rnd.uniform(-8, 8) if rnd.random() < 0.6 else rnd.choice([1e3, 1e6, -100.0, 1e30])
        tensors["coefficients"] = (c.float() * factor + torch.randn(c.shape) * 1e-3).to(c.dtype)
    elif choice < 0.7:
        k = tensors["counts"].reshape(-1)
        i = rnd.randrange(k.numel())
        k[i] = rnd.choice([0, -1, 1, 2, 1000, 32767, -32768])
    elif choice < 0.85:
        key = rnd.choice([k for k in meta if k not in ("format", "version", "contract", "fingerprint")])
        meta[key] = rnd.choice({"round": ["0", "1", "9223372036854775807", "9223372036854775808", "01"],
                                "seed": ["0", "18446744073709551615", "18446744073709551616"],
                                "seeds": ["1,1", "0", "", "1,2,3", "18446744073709551616"],
                                "num_samples": ["1", "4611686018427387904", "0", "9223372036854775807"],
                                "server_lr": ["1e308", "-1e308", "1e30", "0.0", "-0.0", "5e-324", "1e-300", "1e4"],
                                "scale": ["paper", "unbiased", "x"],
                                "start_digest": ["", "xxh3_128:" + "0" * 32, "xxh3_128:" + "G" * 32, "sha256:00"],
                                }.get(key, ["0"]))
    else:
        tensors["coefficients"] = c[:rnd.randrange(c.numel() + 1)] if rnd.random() < 0.5 else torch.cat([c, c[:3]])
    return wire._pack(meta, tensors)


MUTATIONS = {"bit_flips": flip_bits, "byte_overwrites": overwrite, "truncate_or_extend": truncate_or_extend,
             "random_bytes": random_bytes, "crafted_header": crafted_header, "retampered": retampered}


class Arena:
    """The server and client state accepted messages act on."""

    def __init__(self, plan, model):
        self.plan, self.model = plan, model
        self.agg = Aggregator(plan, base_seed=1, max_step=MAX_STEP)
        self.server = copy.deepcopy(model)
        self.pending = 0
        self.rounds = 0
        self.largest_change = 0.0
        self.refused_at_aggregate = 0  # influence_cap: outliers against the round's median

    def add(self, update, client_id) -> str:
        try:
            self.agg.add(update, client_id=client_id)
        except MessageError as exc:
            return f"aggregator:{exc.reason}"
        self.pending += 1
        if self.pending >= APPLY_EVERY:
            self.flush()
        return "aggregator:accepted"

    def flush(self):
        if not self.pending:
            return
        before = [p.detach().clone() for p in self.server.parameters()]
        self.agg.apply_(self.server)
        self.refused_at_aggregate += self.pending - self.agg.last_report["accepted"]
        change = max(float((p.detach() - b).abs().max()) for p, b in zip(self.server.parameters(), before, strict=True))
        check_finite(self.server, "server")
        if change > MAX_STEP * (1 + 1e-5):
            raise AssertionError(f"round {self.rounds} moved a weight by {change} > max_step {MAX_STEP}")
        self.largest_change = max(self.largest_change, change)
        self.pending = 0
        self.rounds += 1
        # every round restarts from the same weights so messages of round 0 stay current
        self.agg = Aggregator(self.plan, base_seed=1, max_step=MAX_STEP)

    def apply_global(self, update: GlobalUpdate) -> str:
        target = copy.deepcopy(self.model)
        try:
            update.apply_(target)
        except MessageError as exc:
            return f"apply:{exc.reason}"
        check_finite(target, "client")
        return "apply:applied"


def check_finite(model, who):
    for n, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise AssertionError(f"{who} weight {n} is not finite")


def run(n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    model = tiny_model()
    plan = FerretPlan.from_model(model, 16)
    clients, globals_ = honest_messages(plan, model)
    arena = Arena(plan, model)
    outcomes = {name: Counter() for name in MUTATIONS}
    stages = Counter()
    failures = []
    slowest = 0.0
    signal.signal(signal.SIGALRM, _alarm)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    names = list(MUTATIONS)
    for i in range(n):
        name = names[i % len(names)]
        source = rnd.choice(clients + globals_)
        data = MUTATIONS[name](rnd, source)
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
        try:
            for decode, kind in ((wire.decode_client_update, "client"), (wire.decode_global_update, "global")):
                try:
                    update = decode(data, plan)
                except MessageError as exc:
                    outcomes[name][f"{kind}:{exc.reason}"] += 1
                    continue
                if data == source:
                    outcomes[name][f"{kind}:unchanged"] += 1  # the mutation happened to restore every byte
                    continue
                outcomes[name][f"{kind}:accepted"] += 1
                if name != "retampered":
                    raise AssertionError("a changed message passed the digest without being re-digested")
                stage = arena.add(update, client_id=i) if kind == "client" else arena.apply_global(update)
                stages[stage] += 1
        except Hang:
            failures.append({"message": i, "mutation": name, "error": f"hang > {HANG_SECONDS}s"})
        except Exception as exc:  # noqa: BLE001 - anything but MessageError is the finding
            failures.append({"message": i, "mutation": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                             "data_head": data[:64].hex()})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t)
        if (i + 1) % 10000 == 0:
            print(f"{i + 1}/{n} messages, {len(failures)} failures, {time.perf_counter() - started:.0f}s",
                  file=sys.stderr, flush=True)
    arena.flush()
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    if growth_mb > MEMORY_MB:
        failures.append({"error": f"peak memory grew by {growth_mb:.0f} MB > {MEMORY_MB} MB"})
    return {
        "messages": n, "decodes": 2 * n, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
        "slowest_message_seconds": round(slowest, 4), "peak_memory_growth_mb": round(growth_mb, 1),
        "rounds_applied": arena.rounds, "refused_at_aggregate": arena.refused_at_aggregate,
        "largest_weight_change": arena.largest_change, "max_step": MAX_STEP,
        "outcomes": {k: dict(sorted(v.items())) for k, v in outcomes.items()},
        "after_decode": dict(sorted(stages.items())), "failures": failures[:50], "failure_count": len(failures),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    result = run(args.n, args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if result["failure_count"]:
        print(f"FAILED: {result['failure_count']} messages escaped the documented behaviour", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
