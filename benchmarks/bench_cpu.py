"""CPU throughput of project / reconstruct: the C++ backend against the ways around it.

All in one run, in elements x bases per second per core (total rate / threads used);
each figure is the median of the timed runs (common.time_call). Methods (the baselines
are common.py's):

  cpp            ferret_kernels backend="cpp" (the C++ extension)
  torch-ref      ferret_kernels backend="torch" (the executable spec; run on a smaller d)
  materialise    common.materialise: torch's generator, then matmul, in float32
  paper          common.paper: the reference code's per-seed trunc_normal_ (float16),
                 then a dot or an axpy; the same numbers stand for both distributions
  roofline       common.roofline: the C++ generation alone (generate_sum)

Each method runs with torch.set_num_threads(t) for every t in --threads (default 1 and
2). torch's CPU generator is serial, so materialise and paper use one core whatever t
is; the t = 1 rows compare like with like per core, the t = 2 rows the whole machine.
Prints a markdown table and the ratios of the targets; --json PATH saves everything.

    .venv/bin/python benchmarks/bench_cpu.py [--d 2097152] [--K 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from common import environment, materialise, paper, roofline, time_call

import ferret_kernels as fk
from ferret_kernels import backends

SEED = 2024


def ferret_op(backend):
    def make(op, dist, d, K):
        x = torch.randn(d)
        gamma = torch.randn(K) * 1e-6
        if op == "project":
            return lambda: fk.project(x, SEED, K, distribution=dist, backend=backend)
        return lambda: fk.reconstruct_(x, gamma, SEED, alpha=1e-3, distribution=dist, backend=backend)

    return make


METHODS = {
    "cpp": ferret_op("cpp"),
    "torch-ref": ferret_op("torch"),
    "materialise": lambda op, dist, d, K: materialise(op, dist, torch.randn(d), torch.randn(K) * 1e-6, SEED),
    "paper": lambda op, dist, d, K: paper(op, torch.randn(d), torch.randn(K) * 1e-6, SEED),
    "roofline": lambda op, dist, d, K: roofline("cpp", dist, d, K, SEED, "cpu"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=2**21, help="elements (default 2**21)")
    p.add_argument("--K", type=int, nargs="+", default=[16, 64], help="bases (default 16 64)")
    p.add_argument("--dists", nargs="+", default=list(fk.DISTRIBUTIONS), choices=fk.DISTRIBUTIONS)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    p.add_argument("--torch-d", type=int, default=2**15, help="elements for the slow torch reference")
    p.add_argument("--paper-K", type=int, default=4, help="seeds timed for the paper's way (rate is per basis)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="save results here")
    args = p.parse_args(argv)

    if backends.cpu_extension() is None:
        print("ferret_kernels._C is not built: `make install` first", file=sys.stderr)
        return 1
    from ferret_kernels import _C

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dist in args.dists:
            for K in args.K:
                for op in ("project", "reconstruct"):
                    for name, make in METHODS.items():
                        d, k_run = args.d, K
                        if name == "torch-ref":
                            d = args.torch_d
                        if name == "paper":
                            if dist != args.dists[0]:  # the same generator for both distributions
                                prev = next(r for r in rows if r["method"] == "paper" and r["op"] == op
                                            and r["K"] == K and r["threads"] == threads)
                                rows.append(dict(prev, dist=dist))
                                continue
                            k_run = min(K, args.paper_K)
                        timing = time_call(make(op, dist, d, k_run), args.repeats, min_time=0.2)
                        rate = d * k_run / timing.median
                        rows.append(dict(threads=threads, dist=dist, K=K, op=op, method=name, d=d, k_timed=k_run,
                                         seconds=timing.median, seconds_min=timing.min, runs=len(timing.runs),
                                         rate=rate, rate_per_core=rate / threads))
                        print(f"  t={threads} {dist:10s} K={K:<3d} {op:11s} {name:11s} "
                              f"{rate / threads / 1e6:10.1f} M/s/core", file=sys.stderr, flush=True)

    def rate(threads, dist, K, op, method):
        return next(r["rate_per_core"] for r in rows if (r["threads"], r["dist"], r["K"], r["op"], r["method"])
                    == (threads, dist, K, op, method))

    env = environment()
    print(f"\nferret_kernels CPU benchmark: d = {args.d} (torch-ref d = {args.torch_d}), {env}, "
          f"C++ path {_C.simd_target()}\n")
    print("Elements x bases per second per core (M/s/core = total rate / threads), medians.\n")
    header = "| threads | dist | K | op | " + " | ".join(METHODS) + " | cpp/paper | cpp/materialise | cpp/roofline |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ratios = []
    for threads in args.threads:
        for dist in args.dists:
            for K in args.K:
                for op in ("project", "reconstruct"):
                    r = {m: rate(threads, dist, K, op, m) for m in METHODS}
                    ratio = dict(threads=threads, dist=dist, K=K, op=op, vs_paper=r["cpp"] / r["paper"],
                                 vs_materialise=r["cpp"] / r["materialise"], vs_roofline=r["cpp"] / r["roofline"])
                    ratios.append(ratio)
                    cells = " | ".join(f"{r[m] / 1e6:,.1f}" for m in METHODS)
                    print(f"| {threads} | {dist} | {K} | {op} | {cells} | {ratio['vs_paper']:.1f}x | "
                          f"{ratio['vs_materialise']:.1f}x | {ratio['vs_roofline']:.2f} |")

    targets = dict(vs_paper=15.0, vs_materialise=3.0, vs_roofline=0.5)
    print("\nTargets: cpp >= 15x paper, >= 3x materialise, >= 0.5x roofline (within 2x).")
    for threads in args.threads:
        sel = [r for r in ratios if r["threads"] == threads]
        worst = {k: min(r[k] for r in sel) for k in targets}
        verdict = ", ".join(f"{k} worst {worst[k]:.2f} ({'met' if worst[k] >= v else 'NOT met'})"
                            for k, v in targets.items())
        print(f"  threads={threads}: {verdict}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(args={k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
                                             env=env, simd_target=_C.simd_target(), machine=platform.machine(),
                                             rows=rows, ratios=ratios), indent=2))
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
