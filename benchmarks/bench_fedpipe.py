"""FedPipe on the embedded SmolLM2-135M: each client's plan, and the planner's memory model
against the training footprint measured at each base precision.

    python benchmarks/bench_fedpipe.py            # plans of the 26 NI-subset clients + measured footprints
    python benchmarks/bench_fedpipe.py --tokens 745 --precisions none,int8,int4

Plans: ``FedPipeClient.setup`` for every client of the shipped NI subset under the default
``fedpipe_profiles`` (client c gets profile c mod n), at its longest example.

Footprint: one fresh process per precision loads the model (the node's full-precision
weights, outside the footprint), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``
"5"), then runs ``FedPipeClient.train`` on one step of one micro-batch of one example of
``--tokens`` tokens: the quantised copy, the importance pass, the adapters at the full
budget, one AdamW step and the upload's encoding; the footprint is the peak RSS (VmHWM)
minus the RSS before.
The prediction is the planner's base + activations + adapter state; the same work's peak of
live tensor bytes (torch's profiler, the planner's own measure) is printed next to it, so
the gap between the two is the model's error and the rest, up to peak RSS, the allocator's.
Prints a JSON line per precision and a table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from contextlib import nullcontext

MB = 2**20


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _config(**overrides):
    from ferret_fl import config

    return config.load(None, dict(model="smollm2-135m", data="ni-subset", algorithm="fedpipe", optimizer="adamw",
                                  lr=1e-3, local_steps=3, batch_size=2, grad_accum=1, max_length=1024, **overrides))


def _example(tokenizer, tokens: int) -> dict:
    """The first ``tokens`` tokens of the NI subset's longest training example, as a micro-batch
    of one, its second half supervised."""
    import torch

    from ferret_fl.data import load_data, tokenize_examples

    items = [it for c in load_data("ni-subset").clients for it in tokenize_examples(c.examples, tokenizer, 1024)]
    ids = max(items, key=lambda it: len(it.input_ids)).input_ids
    if len(ids) < tokens:
        raise ValueError(f"--tokens {tokens}: the longest NI-subset example has {len(ids)} tokens")
    ids = ids[:tokens]
    labels = ids.clone()
    labels[: tokens // 2] = -100
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "labels": labels[None]}


def measure(precision: str, tokens: int, tensors: bool) -> dict:
    """The footprint of one client's training at ``precision`` (run in a fresh process): peak
    RSS, or with ``tensors`` the peak of live tensor bytes (the profiler's records inflate
    RSS, so the two are measured in separate processes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ferret_fl.algorithms import Announcement, build_client, prepare_model
    from ferret_fl.algorithms.base import payload_metadata
    from ferret_fl.fedpipe import planner
    from ferret_fl.models import load_causal_lm

    torch.set_num_threads(1)
    cfg = _config(fedpipe_precisions=precision)
    model, tok = load_causal_lm(cfg.model, seed=cfg.seed)
    model = prepare_model(cfg, model)
    client = build_client(cfg, model)
    memory = client.memory_model()
    batch = _example(tok, tokens)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the loader's freed heap back, so RSS starts from what is live
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    # client 0 (2600 MB) and only this precision allowed: the plan takes it at the full budget
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) if tensors else nullcontext() as prof:
        msg = client.train(model, [[batch]], Announcement(1, cfg.seed, cfg.lr), client_id=0, num_samples=1)
    peak = _rss("VmHWM") - before
    trained = int(payload_metadata(msg.payload)["adapter_params"])
    predicted = memory.footprint(precision, 1, tokens, trained)
    return {"precision": precision, "tokens": tokens, "adapter_params": trained,
            "measured_bytes": None if tensors else peak,
            "tensor_peak_bytes": planner.profiled_peak(prof) if tensors else None, "predicted_bytes": predicted}


def plans() -> list[dict]:
    from ferret_fl.algorithms import build_client, prepare_model
    from ferret_fl.data import load_data, tokenize_examples
    from ferret_fl.models import load_causal_lm

    cfg = _config()
    model, tok = load_causal_lm(cfg.model, seed=cfg.seed)
    client = build_client(cfg, prepare_model(cfg, model))
    out = []
    for c, data in enumerate(load_data("ni-subset").clients):
        tokens = max(len(it.input_ids) for it in tokenize_examples(data.examples, tok, cfg.max_length))
        s = client.setup(c, tokens)
        out.append({"client": c, "profile": cfg.fedpipe_profiles.split(",")[c % len(client.profiles)],
                    "tokens": tokens, "precision": s.precision, "micro_batch": s.micro_batch,
                    "grad_accum": s.grad_accum, "adapter_budget": s.adapter_budget,
                    "predicted_mb": round(s.predicted_bytes["total"] / MB)})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=745, help="tokens of the measured micro-batch")
    parser.add_argument("--precisions", default="none,int8,int4")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this precision
    parser.add_argument("--tensors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.tensors)))
        return 0
    rows = plans()
    print("| client | profile MB:speed | longest example (tokens) | precision | micro-batch x accumulation | "
          "adapter params | predicted MB |")
    print("|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['client']} | {r['profile']} | {r['tokens']} | {r['precision']} | {r['micro_batch']} x "
              f"{r['grad_accum']} | {r['adapter_budget']:,} | {r['predicted_mb']} |")
    counts = {p: sum(r["precision"] == p for r in rows) for p in ("none", "int8", "int4")}
    print(f"\nclients by precision: {counts}\n")
    results = []
    for precision in args.precisions.split(","):
        both = []
        for extra in ([], ["--tensors"]):
            out = subprocess.run([sys.executable, __file__, "--one", precision, "--tokens", str(args.tokens), *extra],
                                 check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            both.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results.append({**both[0], "tensor_peak_bytes": both[1]["tensor_peak_bytes"]})
        print(json.dumps(results[-1]), flush=True)
    print("\n| base precision | predicted MB (base + activations + adapters) | measured tensor peak MB | "
          "measured peak RSS MB | RSS / predicted |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        p = r["predicted_bytes"]
        print(f"| {r['precision']} | {p['total'] / MB:.0f} ({p['base'] / MB:.0f} + {p['activations'] / MB:.0f} + "
              f"{p['adapters'] / MB:.0f}) | {r['tensor_peak_bytes'] / MB:.0f} | {r['measured_bytes'] / MB:.0f} | "
              f"{r['measured_bytes'] / p['total']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
