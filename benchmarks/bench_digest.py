"""The replay guard's weight digest on SmolLM2-135M-sized weights, against other hashes.

Times ``plan.digest(model)`` (xxh3-128 over every plan tensor, read in place) on the
embedded SmolLM2-135M-Instruct in float32 and bfloat16, next to blake3 (one thread and
all threads, when installed) and sha256 over the same bytes, and next to the round phase
it guards (``GlobalUpdate.apply_``, one reconstruct pass). Best of ``--repeat`` runs each.

    python benchmarks/bench_digest.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time

import torch

import ferret_kernels as fk
from ferret_fl.models import EMBEDDED_DEFAULT, load_causal_lm


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    model, _ = load_causal_lm(EMBEDDED_DEFAULT)
    result = {"model": EMBEDDED_DEFAULT, "threads": torch.get_num_threads(), "rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(dtype)
        plan = fk.FerretPlan.from_model(m, 7800)
        params = plan.parameters(m)
        views = [memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()) for t in params]
        nbytes = sum(v.nbytes for v in views)
        row = {"dtype": str(dtype).removeprefix("torch."), "bytes": nbytes,
               "plan.digest (xxh3_128)": best(lambda m=m, plan=plan: plan.digest(m), args.repeat)}

        def sha256(views=views):
            h = hashlib.sha256()
            for v in views:
                h.update(v)

        row["sha256"] = best(sha256, args.repeat)
        try:
            import blake3

            for name, threads in (("blake3 (1 thread)", 1), ("blake3 (all threads)", blake3.blake3.AUTO)):
                def b3(views=views, threads=threads):
                    h = blake3.blake3(max_threads=threads)
                    for v in views:
                        h.update(v)

                row[name] = best(b3, args.repeat)
        except ImportError:
            pass
        agg = fk.Aggregator(plan, round=1, base_seed=7)
        counts = plan.counts_for([1.0] * plan.num_blocks, "uniform")
        agg.add(fk.ClientUpdate(1, agg.seed, tuple(counts), torch.randn(7800) * 1e-6, 1, plan.fingerprint))
        g = agg.aggregate()
        target = copy.deepcopy(m)
        row["GlobalUpdate.apply_ (unguarded)"] = best(lambda g=g, target=target: g.apply_(target), 1)
        row["digest share of apply"] = row["plan.digest (xxh3_128)"] / row["GlobalUpdate.apply_ (unguarded)"]
        row["GB/s (xxh3_128)"] = nbytes / row["plan.digest (xxh3_128)"] / 1e9
        print(json.dumps(row, indent=1), flush=True)
        result["rows"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
