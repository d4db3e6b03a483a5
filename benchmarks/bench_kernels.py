"""Throughput of seeded project / reconstruct, side by side in one run.

Rates are elements x bases per second (d * K / seconds, seconds the median of the
timed runs; common.time_call, or triton.testing.do_bench's median on CUDA), and per
core on the CPU. Compared on the same device and sizes (baselines from common.py):
  ferret:<backend>   our fused ops (triton on CUDA; cpp = C++ extension; torch reference)
  materialise+matmul torch's generator for a chunk of V, then matmul
  reference-code     the paper's code: per basis torch.manual_seed(seed), trunc_normal_,
                     then a dot (project) or an axpy (reconstruct)
  generate-only      the backend's generation alone (generate_sum): the roofline

    python benchmarks/bench_kernels.py                      # CPU, d = 2**20, K = 32
    python benchmarks/bench_kernels.py --device cuda --d 67108864 --K 64
    python benchmarks/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from common import environment, materialise, paper, roofline, time_call

import ferret_kernels as fk
from ferret_kernels import backends


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeat), return_mode="median") / 1e3
    return time_call(fn, repeat).median


def run(args) -> list[dict]:
    device = args.device
    d, K = args.d, args.K
    cores = torch.get_num_threads() if device == "cpu" else 1
    x = torch.randn(d, device=device)
    gamma = torch.randn(K, device=device)
    rows = []

    def record(method, op, dist, fn, size_d=d):
        seconds = timed(fn, device, args.repeat)
        rate = size_d * K / seconds
        rows.append(dict(method=method, op=op, dist=dist, d=size_d, K=K, seconds=seconds, rate=rate,
                         rate_per_core=rate / cores))
        print(f"  {method:<20} {op:<12} {dist:<10} {seconds * 1e3:10.2f} ms  {rate / cores:12.4g} /s/core",
              flush=True)

    ferret_backends = ["triton"] if device == "cuda" else (["cpp"] if backends.cpu_extension() else [])
    for dist in args.dist:
        for be in ferret_backends:
            record(f"ferret:{be}", "project", dist, partial(fk.project, x, 1, K, distribution=dist, backend=be))
            out = torch.zeros(d, device=device)
            record(f"ferret:{be}", "reconstruct", dist,
                   partial(fk.reconstruct_, out, gamma, 1, distribution=dist, backend=be))
        if device == "cpu" and args.torch_reference:
            small = min(d, 1 << 16)
            xs, outs = x[:small].clone(), torch.zeros(small)
            record("ferret:torch", "project", dist, partial(fk.project, xs, 1, K, distribution=dist, backend="torch"),
                   small)
            record("ferret:torch", "reconstruct", dist,
                   partial(fk.reconstruct_, outs, gamma, 1, distribution=dist, backend="torch"), small)
        if ferret_backends:
            record("generate-only", "-", dist, roofline(ferret_backends[0], dist, d, K, 0, device))
    record("materialise+matmul", "project", "torch.randn", materialise("project", "gaussian", x, gamma, 0))
    out = torch.zeros(d, device=device)
    record("materialise+matmul", "reconstruct", "torch.randn", materialise("reconstruct", "gaussian", out, gamma, 0))
    draw_dtype = torch.float16 if device == "cuda" else torch.float32
    record("reference-code", "project", "trunc_normal", paper("project", x, gamma, 0, draw_dtype))
    record("reference-code", "reconstruct", "trunc_normal", paper("reconstruct", out, gamma, 0, draw_dtype))
    return rows


def summary(rows: list[dict]) -> str:
    def rate(method, op, dist=None):
        for r in rows:
            if r["method"] == method and r["op"] == op and (dist is None or r["dist"] == dist):
                return r["rate"]
        return None

    lines = ["| method | op | distribution | d | K | ms | elements x bases / s / core |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['op']} | {r['dist']} | {r['d']} | {r['K']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r['rate_per_core']:.3g} |")
    ratios = []
    for r in rows:
        if not r["method"].startswith("ferret:") or r["method"] == "ferret:torch":
            continue
        parts = [f"{r['method']} {r['op']} {r['dist']}:"]
        for label, base in (("reference-code", rate("reference-code", r["op"])),
                            ("materialise+matmul", rate("materialise+matmul", r["op"])),
                            ("generate-only", rate("generate-only", "-", r["dist"]))):
            if base:
                parts.append(f"{r['rate'] / base:.2f}x {label}")
        ratios.append(" ".join(parts))
    return "\n".join(lines + [""] + ratios)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d", type=int, default=1 << 20)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--dist", nargs="+", default=["gaussian", "rademacher"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-torch-reference", dest="torch_reference", action="store_false")
    p.add_argument("--json", help="write rows and environment to this path")
    args = p.parse_args()
    env = environment(args.device)
    print(f"# {env}", flush=True)
    rows = run(args)
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
