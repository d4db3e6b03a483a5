"""Modelled GPU throughput of the Triton kernels from their SASS, without a GPU.

Each hot kernel is compiled as the launchers compile it (the gpu-audit path) for sm_80
and sm_90; the opcodes of its per-basis loop (the innermost loop running Philox) are
counted and assigned to the pipes that execute them, and the loop's time per warp
iteration is the largest of

  issue   every instruction, 1 per cycle per SM sub-partition (4 per SM)
  pipe    each pipe's instructions / its rate per sub-partition (warp instr per cycle):
          A100: fma 0.5 (FP32 and IMAD share it), alu 0.5, xu 0.125, lsu 0.25
          H100: fmaheavy 0.5 (IMAD) + fmalite 0.5 (FP32 only): fp32 1.0 in all, alu 0.5,
                xu 0.125, lsu 0.25

(rates from the CUDA C++ Programming Guide's throughput table: FP32 64 / 128 per SM,
INT32 64, special functions 16, load/store 32). A warp iteration covers TILE /
num_warps elements of one basis, so the model gives elements x bases per second at
full occupancy with every latency hidden: an issue-bound ceiling, not a measurement.
The clocks are the boost clocks of the SXM parts: H100 SXM5 132 SMs at 1.98 GHz, A100
SXM4 108 SMs at 1.41 GHz (an H100 PCIe, 114 SMs at 1.755 GHz, is 0.77x the H100 rows).

    .venv/bin/python benchmarks/model_gpu.py [--json out.json]     # no GPU needed
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from common import environment

from ferret_kernels import config
from ferret_kernels.backends.triton import audit

GPUS = {
    "H100 SXM": dict(arch=90, sms=132, ghz=1.98, rates=dict(fmaheavy=0.5, fp32=1.0, alu=0.5, xu=0.125, lsu=0.25)),
    "A100 SXM": dict(arch=80, sms=108, ghz=1.41, rates=dict(fmaheavy=0.5, fp32=0.5, alu=0.5, xu=0.125, lsu=0.25)),
}
# Rademacher project's aligned variant is the one a model's tensors take (project.LANE_PER_CALL);
# the unaligned one stays for comparison.
KERNELS = ("reconstruct bfloat16 gaussian aligned", "project bfloat16 gaussian aligned", "generate_sum gaussian",
           "reconstruct bfloat16 rademacher", "project bfloat16 rademacher aligned", "project bfloat16 rademacher",
           "generate_sum rademacher")
# open_llama_3b, K = 7800 by the norm rule on an update of equal per-element size
# (benchmarks/bench_launch.py prints the layout): sum_l d_l K_l.
OPEN_LLAMA_3B_ELEMENT_BASES = 169_920_851_200


def pipe(op: str) -> str:
    """The pipe an opcode issues to (Nsight Compute's names)."""
    base = op.split(".")[0]
    if base in ("IMAD", "IMUL", "IDP", "IMNMX") or op.startswith("IMAD"):
        return "fmaheavy"
    if base in ("FADD", "FMUL", "FFMA", "FMNMX", "HADD2", "HMUL2", "HFMA2"):
        return "fp32"
    if base in ("MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"):
        return "xu"
    if base in ("LDG", "STG", "LDS", "STS", "LDSM", "LDL", "STL", "ATOM", "RED", "LD", "ST", "SHFL", "MATCH"):
        return "lsu"
    if base.startswith("U") or base in ("BRA", "NOP", "BAR", "EXIT", "WARPSYNC", "BSYNC", "BSSY", "CCTL", "DEPBAR"):
        return "other"  # uniform datapath and control: an issue slot, no vector pipe
    return "alu"


def model(counts: Counter, elements: int, gpu: dict) -> dict:
    per_pipe = Counter()
    for op, n in counts.items():
        per_pipe[pipe(op)] += n
    rates = gpu["rates"]
    cycles = {
        "issue": sum(counts.values()),
        "fmaheavy": per_pipe["fmaheavy"] / rates["fmaheavy"],
        "fp32": (per_pipe["fp32"] + per_pipe["fmaheavy"]) / rates["fp32"],
        "alu": per_pipe["alu"] / rates["alu"],
        "xu": per_pipe["xu"] / rates["xu"],
        "lsu": per_pipe["lsu"] / rates["lsu"],
    }
    bound = max(cycles, key=cycles.get)
    rate = 4 * elements / cycles[bound] * gpu["sms"] * gpu["ghz"] * 1e9
    return dict(instructions=sum(counts.values()), pipes=dict(per_pipe), cycles=cycles, bound=bound, rate=rate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the model's inputs and outputs here")
    args = p.parse_args(argv)
    if config.triton_interpret():
        print("the model compiles for real GPUs: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    variants = {v.label: v for v in audit.variants()}
    rows = []
    for label in KERNELS:
        launch = variants[label].launch
        elements = launch.constexprs["TILE"] // launch.num_warps
        for name, gpu in GPUS.items():
            kernel = audit.compile_launch(launch, gpu["arch"])
            counts = audit.hot_loop(audit.sass(kernel.asm["cubin"])[0])
            rows.append(dict(kernel=label, gpu=name, elements_per_warp_iteration=elements, hot_loop=dict(counts),
                             **model(counts, elements, gpu)))
    print(f"# modelled, not measured: SASS issue model, {environment()}\n")
    print("| kernel | GPU | SASS / warp iteration | elements / warp iteration | instr / element | bound by | "
          "modelled G elements x bases / s | open_llama_3b aggregation, modelled s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        seconds = OPEN_LLAMA_3B_ELEMENT_BASES / r["rate"] if r["kernel"].startswith("reconstruct") else None
        print(f"| {r['kernel']} | {r['gpu']} | {r['instructions']} | {r['elements_per_warp_iteration']} | "
              f"{r['instructions'] / r['elements_per_warp_iteration']:.2f} | {r['bound']} | {r['rate'] / 1e9:,.0f} | "
              + (f"{seconds:.2f}" if seconds else "") + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=environment(), gpus=GPUS, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
