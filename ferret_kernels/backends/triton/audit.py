"""Compile audit of the Triton kernels for NVIDIA GPUs, without a GPU (``make gpu-audit``).

Every kernel variant the launchers can produce is compiled ahead of time for sm_80
(A100) and sm_90 (H100) through Triton's own launch path (``JITFunction.warmup`` with
the launch's arguments and options; a stand-in driver names the target instead of a
GPU), so the signature, specialisation and options are exactly those a real launch
compiles. The variants come from the launchers themselves: each op's ``prepare`` is
run on small probe layouts that produce every launch group (dtype x distribution x
alignment). Each compiled kernel must show:

  * PTX: no approximate float instruction (div/rcp/sqrt/rsqrt/ex2/lg2/sin/cos/tanh
    .approx, div.full), no float fma/mad, and every float add/sub/mul rounded (.rn) so
    ptxas cannot contract it either: the contract (docs/rng.md) needs each operation
    rounded on its own. No 64-bit high product (mul.hi.u64): Philox's products are
    32 x 32 bits, and a counter word promoted to 64 bits (an int64 basis index, say)
    makes the compiled kernel compute other bits while Triton's interpreter, which
    types Python ints differently, still matches the contract in the tests.
  * SASS (cuobjdump from the triton wheel): no local-memory traffic (LDL/STL, i.e.
    register spills) and no stack frame.

``--self-test`` first proves the checks bite: a fusion-on build must be flagged for
fma, a division for an approximate instruction, Philox on an int64 basis index for
64-bit products, a register cap for spills.

    python -m ferret_kernels.backends.triton.audit [--arch 80 90] [--jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from ... import config, functional, rng
from ...layout import BlockLayout
from . import basis, generate, project, reconstruct
from ._launch import COMPILE_OPTIONS, DTYPES, Launch
from ._rng import rademacher_words

ARCHS = (80, 90)

# A probe layout for project / reconstruct: one 12-element tensor cut into blocks of 4,
# 3 and 5 elements, so the gaussian launchers produce an aligned group (block 0) and an
# unaligned one (blocks 1, 2).
PROBE_SIZES = (4, 3, 5)

# Two 32 x 32 products per round and 10 rounds, less those the compiler folds.
PHILOX_PRODUCTS = 16

_APPROX = re.compile(r"\b(?:div|rcp|sqrt|rsqrt|ex2|lg2|sin|cos|tanh)\.approx\S*|\bdiv\.full\.\S+")
_FLOAT_FMA = re.compile(r"\b(?:fma|mad)\.\S*\b(?:f16|bf16|f32|f64|f16x2|bf16x2)\b")
_WIDE_MULHI = re.compile(r"\bmul\.hi\.[us]64\b")
_UNROUNDED = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f32\b", re.M)
_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*?);")


@dataclass(frozen=True)
class Variant:
    """A kernel variant: the launch that produces it and a readable label."""

    label: str
    launch: Launch


def variants() -> list[Variant]:
    """One launch per distinct variant the launchers produce, from the launchers."""
    cpu = torch.device("cpu")
    seed = 2**64 - 1
    out: dict[str, Variant] = {}

    def add(launches: list[Launch], what: str) -> None:
        for launch in launches:
            c = launch.constexprs
            parts = [launch.kernel.__name__.strip("_").removesuffix("_kernel"), what]
            if "DIST" in c:
                parts.append(rng.DISTRIBUTIONS[c["DIST"]])
            if c.get("ALIGNED"):
                parts.append("aligned")
            label = " ".join(p for p in parts if p)
            out.setdefault(label, Variant(label, launch))

    for dist in rng.DISTRIBUTIONS:
        for dtype in DTYPES:
            views = [torch.empty(sum(PROBE_SIZES), dtype=dtype, device="meta")]
            layout = BlockLayout.build(PROBE_SIZES, [9] * len(PROBE_SIZES))
            cut = functional._cut(layout, views)
            name = str(dtype).removeprefix("torch.")
            launches, _ = project.prepare(views, cut, layout, seed, dist, device=cpu)
            add([launch for launch in launches if launch.kernel is project._project_kernel], name)
            add([launch for launch in launches if launch.kernel is project._sum_runs_kernel], "")
            add(reconstruct.prepare(views, cut, [layout], torch.zeros(layout.total_count), [seed], 1.0, dist,
                                    device=cpu), name)
        add(basis.prepare(seed, 2, 5, 0, 3, 0, dist, cpu)[0], "")
        add(generate.prepare(seed, 2, 5, dist, cpu)[0], "")
    return list(out.values())


def arg_types(launch: Launch) -> tuple[str, ...]:
    """The type Triton gives each runtime argument (pointers by dtype, integers i32 below
    2**31 and i64/u64 above, floats fp32): two launches of one kernel with the same
    constexprs, warps and these types share one compiled binary."""
    types = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            types.append("*" + str(a.dtype).removeprefix("torch."))
        elif isinstance(a, bool):
            types.append("i1")
        elif isinstance(a, int):
            types.append("i32" if -(2**31) <= a < 2**31 else ("u64" if a >= 2**63 else "i64"))
        elif isinstance(a, float):
            types.append("fp32")
        else:
            types.append(type(a).__name__)
    return tuple(types)


def variant_key(launch: Launch) -> tuple:
    return (launch.kernel.__name__, tuple(sorted(launch.constexprs.items())), launch.num_warps, arg_types(launch))


class _TargetDriver:
    """What ``JITFunction.warmup`` asks of the active driver, for a GPU that is not here:
    the device id is the arch, so each arch gets its own compiled-kernel cache."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_launch(launch: Launch, arch: int, **overrides):
    """The CompiledKernel a real launch of ``launch`` would build on an sm_<arch> GPU
    (``overrides`` change compile options, for the self-test). Leaves the stand-in
    driver active: for processes that compile and never launch."""
    from triton.runtime import driver

    driver.set_active(_TargetDriver(arch))
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **{**launch.options(), **overrides})


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the triton wheel ships {name} with its NVIDIA backend")
    return path


def sass(cubin: bytes) -> tuple[str, dict[str, int]]:
    """SASS text and resource usage (REG, STACK, SHARED, LOCAL) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(f.name)
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return text, usage


def ptx_findings(ptx: str) -> list[str]:
    """Approximate or contracted float instructions in PTX."""
    found = []
    for pattern, what in ((_APPROX, "approximate"), (_FLOAT_FMA, "contracted (fma/mad)")):
        hits = Counter(pattern.findall(ptx))
        found += [f"{what} float instruction {op} x{n}" for op, n in sorted(hits.items())]
    unrounded = len(_UNROUNDED.findall(ptx))
    if unrounded:
        found.append(f"float add/sub/mul without .rn x{unrounded} (ptxas may contract them)")
    wide = len(_WIDE_MULHI.findall(ptx))
    if wide:
        found.append(f"64-bit high product mul.hi.u64 x{wide}: a Philox word promoted to 64 bits")
    return found


def sass_instructions(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every SASS instruction."""
    return [(int(a, 16), op, rest) for a, op, rest in _SASS_INSTR.findall(text)]


def sass_findings(text: str, usage: dict[str, int]) -> list[str]:
    spills = Counter(op.split(".")[0] for _, op, _ in sass_instructions(text) if op.split(".")[0] in ("LDL", "STL"))
    found = [f"register spill: {op} x{n}" for op, n in sorted(spills.items())]
    if usage.get("LOCAL", 0) or usage.get("STACK", 0):
        found.append(f"local memory {usage.get('LOCAL', 0)} B, stack frame {usage.get('STACK', 0)} B")
    return found


def hot_loop(text: str) -> Counter:
    """Opcode counts of the innermost loop that runs Philox (the per-basis work): the
    smallest backward branch whose body holds a Philox call's 32x32 -> 64-bit products
    (IMAD.HI, or IMAD.WIDE.U32 where ptxas takes both halves at once; at least
    PHILOX_PRODUCTS of them, so an address computation does not count)."""
    ins = sass_instructions(text)
    index = {addr: i for i, (addr, _, _) in enumerate(ins)}
    best = None
    for i, (_, op, rest) in enumerate(ins):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        if not m or int(m.group(1), 16) not in index:
            continue
        start = index[int(m.group(1), 16)]
        products = sum(o in ("IMAD.HI.U32", "IMAD.WIDE.U32") for _, o, _ in ins[start:i])
        if start >= i or products < PHILOX_PRODUCTS:
            continue
        if best is None or i - start < best[1] - best[0]:
            best = (start, i)
    if best is None:
        return Counter()
    return Counter(op for _, op, _ in ins[best[0]:best[1] + 1])


@dataclass
class Result:
    label: str
    arch: int
    seconds: float
    registers: int = 0
    findings: tuple[str, ...] = ()
    error: str = ""
    hot_loop: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.error and not self.findings


def audit_kernel(kernel, label: str, arch: int, seconds: float) -> Result:
    text, usage = sass(kernel.asm["cubin"])
    found = ptx_findings(kernel.asm["ptx"]) + sass_findings(text, usage)
    return Result(label, arch, seconds, usage.get("REG", 0), tuple(found), hot_loop=dict(hot_loop(text)))


def _audit_one(task: tuple[int, int]) -> Result:
    index, arch = task
    v = variants()[index]
    t0 = time.perf_counter()
    try:
        kernel = compile_launch(v.launch, arch)
    except Exception as exc:  # noqa: BLE001 - any compile failure is the finding
        return Result(v.label, arch, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:2000])
    return audit_kernel(kernel, v.label, arch, time.perf_counter() - t0)


@triton.jit
def _divide_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i) / tl.load(y_ptr + i))


@triton.jit
def _int64_basis_kernel(out_ptr, k_ptr, BLOCK: tl.constexpr):
    """Philox with the basis index left int64, as a loop over a loaded count gives it."""
    key = tl.zeros([], dtype=tl.uint32)
    w0, w1, w2, w3 = rademacher_words(tl.arange(0, BLOCK).to(tl.int64), tl.load(k_ptr), key, key, key)
    tl.store(out_ptr + tl.arange(0, BLOCK), (w0 ^ w1 ^ w2 ^ w3).to(tl.int64))


def self_test(arch: int = 90) -> list[str]:
    """Failures of the checks to flag what they must: empty when the audit works."""
    problems = []
    gaussian = next(v for v in variants() if v.label == "reconstruct float32 gaussian")
    fused = audit_kernel(compile_launch(gaussian.launch, arch, enable_fp_fusion=True), "fusion on", arch, 0.0)
    if not any("fma" in f for f in fused.findings):
        problems.append(f"a fusion-on build of {gaussian.label} was not flagged for fma: {fused.findings}")
    x = torch.empty(128)
    divide = Launch(_divide_kernel, (1,), (x, x), dict(BLOCK=128), 4)
    approx = audit_kernel(compile_launch(divide, arch, enable_fp_fusion=True), "x / y", arch, 0.0)
    if not any("approximate" in f for f in approx.findings):
        problems.append(f"a float division (div.full) was not flagged as approximate: {approx.findings}")
    words = torch.empty(128, dtype=torch.int64)
    wide = Launch(_int64_basis_kernel, (1,), (words, words), dict(BLOCK=128), 4)
    promoted = audit_kernel(compile_launch(wide, arch), "int64 basis index", arch, 0.0)
    if not any("mul.hi.u64" in f for f in promoted.findings):
        problems.append(f"Philox on an int64 basis index was not flagged for 64-bit products: {promoted.findings}")
    rademacher = next(v for v in variants() if v.label == "reconstruct float32 rademacher")
    capped = audit_kernel(compile_launch(rademacher.launch, arch, maxnreg=64), "64 registers", arch, 0.0)
    if not any("spill" in f for f in capped.findings):
        problems.append(f"{rademacher.label} capped at 64 registers was not flagged for spills: {capped.findings}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default 80 90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    p.add_argument("--self-test", action="store_true", help="also prove the checks flag bad builds")
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    if config.triton_interpret():
        print("gpu-audit compiles for real GPUs: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    problems = self_test() if args.self_test else []
    for problem in problems:
        print(f"SELF-TEST FAILED: {problem}")
    tasks = [(i, arch) for arch in args.arch for i in range(len(variants()))]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_audit_one, tasks))
    else:
        results = [_audit_one(t) for t in tasks]
    for r in results:
        status = "ok" if r.ok else "FAIL"
        print(f"{status:4s} sm_{r.arch} {r.label:40s} {r.registers:4d} regs  {r.seconds:5.1f} s"
              + "".join(f"\n       {f}" for f in r.findings) + (f"\n       compile error: {r.error}" if r.error else ""))
    failed = [r for r in results if not r.ok]
    print(f"gpu-audit: {len(results)} kernels ({len(results) // len(args.arch)} variants x sm_"
          + "/sm_".join(map(str, args.arch)) + f"), triton {triton.__version__}, {len(failed)} failed"
          + (", self-test " + ("FAILED" if problems else "ok") if args.self_test else "")
          + f", {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, options=COMPILE_OPTIONS,
                           results=[r.__dict__ for r in results], self_test=problems), f, indent=1)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
