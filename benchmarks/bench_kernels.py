"""Throughput of seeded project / reconstruct, side by side in one run.

Rates are elements x bases per second (d * K / seconds), and per core on the CPU.
Compared on the same device and sizes:
  ferret:<backend>   our fused ops (triton on CUDA; cpu = C++ extension; torch reference)
  materialise+matmul torch.randn a chunk of V, then matmul (what one writes in torch)
  reference-code     the paper's code: per basis torch.manual_seed(seed), trunc_normal_,
                     then a dot (project) or an axpy (reconstruct)
  generate-only      the same Philox + Box-Muller with no input read: the roofline

    python benchmarks/bench_kernels.py                      # CPU, d = 2**20, K = 32
    python benchmarks/bench_kernels.py --device cuda --d 67108864 --K 64
    python benchmarks/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from datetime import date
from functools import partial

import torch

import ferret_kernels as fk
from ferret_kernels import backends

# Columns of V materialised at once by the matmul baseline: 64 MiB of float32 at K = 64.
MATERIALISE_CHUNK = 1 << 18


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeat), return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def materialise_project(x, K, gen):
    gamma = torch.zeros(K, device=x.device)
    for i in range(0, x.numel(), MATERIALISE_CHUNK):
        chunk = x[i:i + MATERIALISE_CHUNK]
        v = torch.randn(K, chunk.numel(), device=x.device, generator=gen)
        gamma += v @ chunk
    return gamma


def materialise_reconstruct(out, gamma, gen):
    for i in range(0, out.numel(), MATERIALISE_CHUNK):
        chunk = out[i:i + MATERIALISE_CHUNK]
        v = torch.randn(gamma.numel(), chunk.numel(), device=out.device, generator=gen)
        chunk += gamma @ v
    return out


def reference_code_project(x, K, dtype):
    """The paper's way: one full-size truncated-normal draw per seed, then a dot."""
    bound = 1 / math.sqrt(x.numel())
    gamma = torch.empty(K, device=x.device)
    for seed in range(K):
        torch.manual_seed(seed)
        v = torch.nn.init.trunc_normal_(torch.empty(x.numel(), device=x.device, dtype=dtype), 0, 1, -bound, bound)
        gamma[seed] = torch.dot(v.float(), x)
    return gamma


def reference_code_reconstruct(out, gamma, dtype):
    bound = 1 / math.sqrt(out.numel())
    for seed in range(gamma.numel()):
        torch.manual_seed(seed)
        v = torch.nn.init.trunc_normal_(torch.empty(out.numel(), device=out.device, dtype=dtype), 0, 1, -bound, bound)
        out.add_(v.float(), alpha=float(gamma[seed]))
    return out


def generate_only(device: str, d: int, K: int, dist: str):
    if device == "cuda":
        from ferret_kernels.ops.generate import generate_sum

        return lambda: generate_sum(d, K, 0, dist, device)
    if backends.cpu_extension() is not None:
        from ferret_kernels import cpu

        return lambda: cpu.generate_sum(0, K, d, dist)
    return None


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> list[dict]:
    device = args.device
    d, K = args.d, args.K
    cores = torch.get_num_threads() if device == "cpu" else 1
    x = torch.randn(d, device=device)
    gamma = torch.randn(K, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []

    def record(method, op, dist, fn, size_d=d):
        seconds = timed(fn, device, args.repeat)
        rate = size_d * K / seconds
        rows.append(dict(method=method, op=op, dist=dist, d=size_d, K=K, seconds=seconds, rate=rate,
                         rate_per_core=rate / cores))
        print(f"  {method:<20} {op:<12} {dist:<10} {seconds * 1e3:10.2f} ms  {rate / cores:12.4g} /s/core",
              flush=True)

    ferret_backends = ["triton"] if device == "cuda" else (["cpu"] if backends.cpu_extension() else [])
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
        gen_fn = generate_only(device, d, K, dist)
        if gen_fn is not None:
            record("generate-only", "-", dist, gen_fn)
    record("materialise+matmul", "project", "torch.randn", lambda: materialise_project(x, K, gen))
    out = torch.zeros(d, device=device)
    record("materialise+matmul", "reconstruct", "torch.randn", lambda: materialise_reconstruct(out, gamma, gen))
    draw_dtype = torch.float16 if device == "cuda" else torch.float32
    record("reference-code", "project", "trunc_normal", lambda: reference_code_project(x, K, draw_dtype))
    record("reference-code", "reconstruct", "trunc_normal", lambda: reference_code_reconstruct(out, gamma, draw_dtype))
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
    env = dict(date=str(date.today()), commit=commit(), device=args.device,
               name=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), torch=torch.__version__)
    print(f"# {env}", flush=True)
    rows = run(args)
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
