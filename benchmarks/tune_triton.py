"""Tile, warps and basis group of the Triton kernels, swept on one GPU in one run.

For each distribution, each op (project, reconstruct, and generate_sum as the
generation-only ceiling) and each candidate shape: compile, check, time. A reconstruct
variant must write the same bits as the shipped shape (the contract fixes every element,
not the launch); a project variant must agree with the shipped one to float32 rounding
of a different summation order. Times are medians of ``triton.testing.do_bench`` on one
bfloat16 tensor of ``--d`` elements (larger than L2), rates in elements x bases / s.

    python benchmarks/tune_triton.py --json tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import triton.testing

import ferret_kernels as fk
from ferret_kernels.backends.triton import _launch, project

CANDIDATES = {
    ("gaussian", "reconstruct"): dict(tile=[512, 1024, 2048, 4096], num_warps=[2, 4, 8], k_group=[None]),
    ("gaussian", "project"): dict(tile=[512, 1024, 2048], num_warps=[2, 4, 8], k_group=[4, 8, 16]),
    ("gaussian", "generate"): dict(tile=[1024, 2048], num_warps=[4, 8], k_group=[None]),
    ("rademacher", "reconstruct"): dict(tile=[2048, 4096, 8192], num_warps=[1, 2, 4], k_group=[None]),
    # lane_per_call False: the word hand-over every aligned tensor used until project.LANE_PER_CALL
    ("rademacher", "project"): dict(tile=[2048, 4096], num_warps=[1, 2, 4], k_group=[4, 8, 16],
                                    lane_per_call=[True, False]),
    ("rademacher", "generate"): dict(tile=[4096, 8192], num_warps=[1, 2], k_group=[None]),
}
# Bases per timing: enough work per call (~5-10 ms at the modelled rates) to drown launch cost.
K_OF = {"gaussian": 32, "rademacher": 512}


def set_shape(dist: str, op: str, tile: int, num_warps: int, k_group: int | None,
              lane_per_call: bool | None = None) -> None:
    """Point the launchers at a shape (the module tables are read at every call)."""
    shape = _launch.TileShape(tile, num_warps)
    if op == "project":
        project.SHAPES[dist] = shape
        project.K_GROUP = k_group
        if lane_per_call is not None:
            project.LANE_PER_CALL = lane_per_call
    else:
        _launch.SHAPES[dist] = shape


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=(1 << 27) + 4)
    p.add_argument("--json")
    args = p.parse_args()
    shipped = {"launch": dict(_launch.SHAPES), "project": dict(project.SHAPES), "k_group": project.K_GROUP,
               "lane_per_call": project.LANE_PER_CALL}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.d, device="cuda", generator=g).to(torch.bfloat16)
    rows = []
    for (dist, op), grid in CANDIDATES.items():
        K = K_OF[dist]
        gamma = torch.randn(K, device="cuda", generator=g)
        out = x.clone()
        reference = None
        if op == "reconstruct":
            reference = x.clone()
            fk.reconstruct_(reference, gamma, 5, distribution=dist, backend="triton")
        elif op == "project":
            reference = fk.project(x, 5, K, distribution=dist, backend="triton")
        for tile, warps, k_group, lane in itertools.product(grid["tile"], grid["num_warps"], grid["k_group"],
                                                             grid.get("lane_per_call", [None])):
            set_shape(dist, op, tile, warps, k_group, lane)
            row = dict(dist=dist, op=op, tile=tile, num_warps=warps, k_group=k_group, d=args.d, K=K)
            if lane is not None:
                row["lane_per_call"] = lane
            try:
                if op == "reconstruct":
                    out.copy_(x)
                    fk.reconstruct_(out, gamma, 5, distribution=dist, backend="triton")
                    row["same_bits"] = bool(torch.equal(out.view(torch.int16), reference.view(torch.int16)))
                    fn = partial(fk.reconstruct_, out, gamma, 5, distribution=dist, backend="triton")
                elif op == "project":
                    got = fk.project(x, 5, K, distribution=dist, backend="triton")
                    row["rel_diff"] = float((got - reference).norm() / reference.norm())
                    fn = partial(fk.project, x, 5, K, distribution=dist, backend="triton")
                else:
                    fn = partial(fk.backends.module("triton").generate_sum, 5, K, args.d, dist, torch.device("cuda"))
                ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                row.update(ms=ms, rate=args.d * K / (ms / 1e3))
            except Exception as exc:  # a shape the compiler refuses is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        _launch.SHAPES.clear()
        _launch.SHAPES.update(shipped["launch"])
        project.SHAPES.clear()
        project.SHAPES.update(shipped["project"])
        project.K_GROUP = shipped["k_group"]
        project.LANE_PER_CALL = shipped["lane_per_call"]
    print("\n| dist | op | tile | warps | k_group | lane per call | ms | G elements x bases / s | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        check = r.get("error") or (f"same bits: {r['same_bits']}" if "same_bits" in r else
                                   f"rel diff {r['rel_diff']:.1e}" if "rel_diff" in r else "")
        rate = f"{r['rate'] / 1e9:,.0f}" if "rate" in r else ""
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        lane = {True: "yes", False: "no"}.get(r.get("lane_per_call"), "")
        print(f"| {r['dist']} | {r['op']} | {r['tile']} | {r['num_warps']} | {r['k_group'] or ''} | {lane} | {ms} | "
              f"{rate} | {check} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
