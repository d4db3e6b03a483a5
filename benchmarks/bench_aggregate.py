"""Server aggregation of one Ferret round at open_llama_3b's shape, on this machine's CPU.

The paper's Table 4 (LLaMA-3B, Natural Instructions) reports 24.7 s of aggregation per
round for Ferret on its GPU; this is the same server work on a CPU (different hardware:
compare orders of magnitude, not the ratio): a model with open_llama_3b's parameters in
bfloat16 (3.43e9, 210 blocks of the paper's grouping, values not loaded: every bit
pattern costs the same), one client's ClientUpdate with K = 7800 coefficients allocated
by the norm rule, and per distribution

  decode     wire.decode_client_update of the client's bytes (checks included)
  aggregate  Aggregator.add + aggregate (merge coefficients; no model touched)
  apply      GlobalUpdate.apply_ on the model: one reconstruct over all 3.4e9 weights

Rates are sum_l d_l K_l / apply seconds. The kernel-benchmark shapes run in the same
process (float32 and bfloat16 at d = 2**21, and bfloat16 over the largest block at its
own K), to tell the layout's cost from the kernel's. --explain R adds R interleaved
rounds (A/B/A/B, so a shared machine's load drifts over all of them alike) of: the
first 12 blocks of the layout through reconstruct_blocks_, one flat bfloat16 tensor of
the same element x bases at K = 64, and reconstruct_ at the kernel shapes. Prints
JSON; ~7 GB of RAM.

    nice -n 10 .venv/bin/python benchmarks/bench_aggregate.py [--distributions rademacher gaussian] [--explain 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import OPEN_LLAMA_3B, environment, llama_shapes, norm_counts, time_call

import ferret_kernels as fk
from ferret_kernels import Aggregator, ClientUpdate, FerretPlan, wire

PAPER_AGGREGATION_S = 24.7  # Ferret, LLaMA-3B, Natural Instructions: Shu et al., v3 Table 4 (their GPU)
BASE_SEED = 7


def shaped_module(shapes, dtype) -> torch.nn.Module:
    """An nn.Module whose named_parameters are ``shapes`` in order (dotted names become
    nested submodules), filled with a constant so every page is touched before timing."""
    root = torch.nn.Module()
    for name, shape in shapes:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, 0.01, dtype=dtype), requires_grad=True))
    return root


def kernel_rate(dtype, d: int, K: int, dist: str) -> float:
    """elements x bases / s of one reconstruct_ at (dtype, d, K), median of 3."""
    out = torch.zeros(d, dtype=dtype)
    gamma = torch.randn(K) * 1e-3
    timing = time_call(lambda: fk.reconstruct_(out, gamma, BASE_SEED, distribution=dist, backend="cpp"), 3)
    return d * K / timing.median


def interleaved(model: torch.nn.Module, plan: FerretPlan, counts: list[int], dist: str, rounds: int) -> dict:
    """Median rates (element x bases / s) of layout and flat reconstructs, run in turns."""
    n_blocks = 12
    sizes, ks = plan.block_sizes[:n_blocks], counts[:n_blocks]
    tensors, covered = [], 0
    for p in model.parameters():
        if covered == sum(sizes):
            break
        tensors.append(p.detach())
        covered += p.numel()
    if covered != sum(sizes):
        raise ValueError("the first blocks do not end on a tensor boundary")
    element_bases = sum(d * k for d, k in zip(sizes, ks, strict=True))
    cases = {
        "layout, first 12 blocks": (lambda: fk.reconstruct_blocks_(tensors, sizes, ks, torch.randn(sum(ks)) * 1e-3,
                                                                   BASE_SEED, distribution=dist, backend="cpp"),
                                    element_bases),
    }
    for dtype, d, K in ((torch.bfloat16, element_bases // 64, 64), (torch.float32, 2**21, 64),
                        (torch.bfloat16, 2**21, 64), (torch.bfloat16, max(plan.block_sizes), 101)):
        out, gamma = torch.zeros(d, dtype=dtype), torch.randn(K) * 1e-3
        name = f"flat {str(dtype).removeprefix('torch.')} d={d} K={K}"
        cases[name] = (lambda out=out, gamma=gamma: fk.reconstruct_(out, gamma, BASE_SEED, distribution=dist,
                                                                    backend="cpp"), d * K)
    rates = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (call, work) in cases.items():
            t0 = time.perf_counter()
            call()
            rates[name].append(work / (time.perf_counter() - t0))
    return {name: dict(median=statistics.median(r), runs=r) for name, r in rates.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distributions", nargs="+", default=["rademacher", "gaussian"], choices=fk.DISTRIBUTIONS)
    p.add_argument("--budget", type=int, default=7800)
    p.add_argument("--repeats", type=int, default=1, help="timed applies per distribution (default 1)")
    p.add_argument("--explain", type=int, default=0, metavar="R", help="interleaved layout/flat rounds (default 0)")
    args = p.parse_args(argv)

    shapes = llama_shapes(**OPEN_LLAMA_3B)
    t0 = time.perf_counter()
    model = shaped_module(shapes, torch.bfloat16)
    print(f"model built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    result = dict(env=environment(), paper_gpu_aggregation_s=PAPER_AGGREGATION_S, runs=[])
    for dist in args.distributions:
        plan = FerretPlan.from_model(model, args.budget, distribution=dist, backend="cpp")
        counts = norm_counts(plan)
        agg = Aggregator(plan, round=0, base_seed=BASE_SEED, server_lr=1.0)
        coefficients = torch.randn(sum(counts), generator=torch.Generator().manual_seed(1)) * 1e-4
        update = ClientUpdate(round=0, seed=agg.seed, counts=tuple(counts), coefficients=coefficients, num_samples=40,
                              fingerprint=plan.fingerprint)
        payload = wire.encode_client_update(update)
        element_bases = sum(d * k for d, k in zip(plan.block_sizes, counts, strict=True))
        for repeat in range(args.repeats):
            agg = Aggregator(plan, round=0, base_seed=BASE_SEED, server_lr=1.0)
            t0 = time.perf_counter()
            received = wire.decode_client_update(payload, plan, round=0)
            t1 = time.perf_counter()
            agg.add(received)
            merged = agg.aggregate()
            t2 = time.perf_counter()
            merged.apply_(model)
            t3 = time.perf_counter()
            run = dict(distribution=dist, repeat=repeat, blocks=plan.num_blocks, elements=plan.numel, K=sum(counts),
                       element_bases=element_bases, decode_s=t1 - t0, aggregate_s=t2 - t1, apply_s=t3 - t2,
                       total_s=t3 - t0, rate=element_bases / (t3 - t2), threads=torch.get_num_threads())
            result["runs"].append(run)
            print(f"{dist}: decode {run['decode_s']:.3f} s, aggregate {run['aggregate_s']:.3f} s, apply "
                  f"{run['apply_s']:.1f} s ({run['rate'] / 1e9:.2f} G element-bases/s)", file=sys.stderr, flush=True)
        if args.explain:
            result.setdefault("interleaved", {})[dist] = interleaved(model, plan, counts, dist, args.explain)
            for name, r in result["interleaved"][dist].items():
                print(f"{dist} interleaved: {name}: {r['median'] / 1e9:.3f} G/s", file=sys.stderr, flush=True)
        largest = max(range(plan.num_blocks), key=lambda b: plan.block_sizes[b])
        result.setdefault("kernel", []).extend([
            dict(distribution=dist, dtype="float32", d=2**21, K=64, rate=kernel_rate(torch.float32, 2**21, 64, dist)),
            dict(distribution=dist, dtype="bfloat16", d=2**21, K=64, rate=kernel_rate(torch.bfloat16, 2**21, 64, dist)),
            dict(distribution=dist, dtype="bfloat16", d=plan.block_sizes[largest], K=counts[largest],
                 rate=kernel_rate(torch.bfloat16, plan.block_sizes[largest], counts[largest], dist)),
        ])
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
