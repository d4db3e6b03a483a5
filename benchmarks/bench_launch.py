"""Host-side launch preparation of the Triton backend at open_llama_3b's layout, on the CPU.

Times what one call of ``project_blocks``, ``reconstruct_blocks_`` (one seed: the
server applying one client's round) and ``perturb_blocks_`` does before its kernels
launch: argument checks, layout and segment tables, the per-call buffer and work rows.
The model's tensors live on the meta device (shapes and dtypes, address 0, nothing
allocated) and the tables go to the CPU; the code is the launchers' own
(``ferret_kernels.backends.triton.*.prepare``), stopped where Triton would be called.
A GPU adds one asynchronous host-to-device copy per call (not timed here).

"first" is a call with every layout cache empty; "steady" the median of --repeats
calls after it (min next to it). Prints JSON.

    .venv/bin/python benchmarks/bench_launch.py [--repeats 20] [--distribution gaussian]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import OPEN_LLAMA_3B, environment, llama_shapes, norm_counts, time_call

from ferret_kernels import FerretPlan, functional, layout
from ferret_kernels.backends.triton import project, reconstruct

SEED = 2**63 + 12345  # above 2**31 in both halves: seeds must not change what gets compiled


def clear_layout_caches() -> None:
    layout._build.cache_clear()
    layout.segment_table.cache_clear()
    layout.single_segment.cache_clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=int, default=7800, help="K, coefficients per client (default 7800)")
    p.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    args = p.parse_args(argv)

    shapes = llama_shapes(**OPEN_LLAMA_3B)
    plan = FerretPlan.from_shapes([(n, s, torch.bfloat16) for n, s in shapes], args.budget)
    counts = norm_counts(plan)
    params = [torch.empty(s, dtype=torch.bfloat16, device="meta") for _, s in shapes]
    cpu = torch.device("cpu")
    gamma = torch.randn(sum(counts))
    dist = args.distribution

    def project_call():
        views = layout.flat_views(params, "x")
        lay = layout.BlockLayout.build(plan.block_sizes, counts)
        return project.prepare(views, functional._cut(lay, views), lay, SEED, dist, device=cpu)

    def reconstruct_call():
        views = layout.flat_views(params, "out")
        layouts = functional._seed_layouts(plan.block_sizes, [counts], None)
        return reconstruct.prepare(views, functional._cut(layouts[0], views), layouts, gamma, [SEED], -1.0, dist,
                                   device=cpu)

    def perturb_call():
        views = layout.flat_views(params, "out")
        lay = layout.BlockLayout.build(plan.block_sizes, [1] * plan.num_blocks)
        ones = torch.ones(plan.num_blocks)
        return reconstruct.prepare(views, functional._cut(lay, views), [lay], ones, [SEED], 1e-3, dist,
                                   [[7] * plan.num_blocks], device=cpu)

    result = dict(env=environment(), distribution=dist,
                  layout=dict(tensors=len(params), blocks=plan.num_blocks, elements=plan.numel, K=sum(counts),
                              element_bases=sum(d * k for d, k in zip(plan.block_sizes, counts, strict=True))))
    for name, call in (("project", project_call), ("reconstruct", reconstruct_call), ("perturb", perturb_call)):
        clear_layout_caches()
        t0 = time.perf_counter()
        launches = call()
        if isinstance(launches, tuple):
            launches = launches[0]
        first = time.perf_counter() - t0
        steady = time_call(call, args.repeats, warmup=0)
        result[name] = dict(first_s=first, steady_median_s=steady.median, steady_min_s=steady.min,
                            launches=len(launches), programs=sum(launch.grid[0] for launch in launches))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
