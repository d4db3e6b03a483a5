"""What the benchmarks share: one timer, the baselines, the model shapes, the environment.

Every benchmark reports the median of its timed runs (``Timing.median``); the minimum
is kept next to it (``Timing.min``) because on a shared machine it is the least
disturbed run. Baselines (what one would write without ferret_kernels) live here once:

  materialise  a chunk of V from torch.randn (gaussian) or torch.randint (rademacher),
               then one matmul per chunk, in float32
  paper        the reference code's way: per seed (basis) torch.manual_seed, a
               trunc_normal_ vector of the block's size, then a dot (project) or an
               axpy (reconstruct); only gaussian-ish, so it stands for both distributions
  roofline     the backend's generation alone (``Backend.generate_sum``): the same
               Philox and float stages with no input read
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import date

import torch

from ferret_kernels import backends

# Columns of V materialised at once by the matmul baseline: 4 MiB of float32 at K = 1.
MATERIALISE_FLOATS = 1 << 20


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed runs (after warm-up) and their statistics."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)


def time_call(fn, repeats: int = 3, *, min_time: float = 0.0, warmup: int = 1, device: str = "cpu") -> Timing:
    """Wall seconds of ``fn()`` over at least ``repeats`` runs (more until ``min_time`` is
    spent), after ``warmup`` untimed runs. On CUDA, each run ends with a synchronize."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    runs, spent = [], 0.0
    while len(runs) < repeats or spent < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        runs.append(dt)
        spent += dt
    return Timing(tuple(runs))


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict:
    """Where and when: on a shared CPU the 1-minute load average says how contended it was."""
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return dict(date=str(date.today()), commit=commit(), device=device, name=name, threads=torch.get_num_threads(),
                cores=os.cpu_count(), load_average=round(os.getloadavg()[0], 2), torch=torch.__version__)


# ------------------------------------------------------------------------- model shapes

# openlm-research/open_llama_3b (the paper's 3B model): hidden, intermediate, layers, vocab.
OPEN_LLAMA_3B = dict(hidden=3200, intermediate=8640, layers=26, vocab=32000)


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a LLaMA causal LM's parameters in ``named_parameters`` order."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{m}_proj.weight", (hidden, hidden)) for m in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def norm_counts(plan) -> list[int]:
    """The plan's per-block counts for an update of equal per-element magnitude
    (||Delta_l|| proportional to sqrt(d_l)) under its allocation rule."""
    return plan.counts_for([math.sqrt(d) for d in plan.block_sizes])


# ---------------------------------------------------------------------------- baselines
# Each returns a zero-argument callable doing K bases x d elements of one op.

def materialise(op: str, dist: str, x: torch.Tensor, gamma: torch.Tensor, seed: int):
    K, d = gamma.numel(), x.numel()
    n = max(128, MATERIALISE_FLOATS // K)
    gen = torch.Generator(device=x.device).manual_seed(seed)

    def chunk(cols):
        if dist == "gaussian":
            return torch.randn(K, cols, generator=gen, device=x.device)
        return torch.randint(0, 2, (K, cols), generator=gen, device=x.device, dtype=torch.float32).mul_(2).sub_(1)

    def project():
        out = torch.zeros(K, device=x.device)
        for i in range(0, d, n):
            m = min(n, d - i)
            out += chunk(m) @ x[i:i + m]
        return out

    def reconstruct():
        for i in range(0, d, n):
            m = min(n, d - i)
            x[i:i + m].add_(gamma @ chunk(m), alpha=1e-3)

    return project if op == "project" else reconstruct


def paper(op: str, x: torch.Tensor, gamma: torch.Tensor, seed: int, draw_dtype=torch.float16):
    """The reference code: float16 draws (as the paper) where the device computes in
    float16; pass draw_dtype=torch.float32 for a CPU without fast float16."""
    K, d = gamma.numel(), x.numel()
    v = torch.empty(d, dtype=draw_dtype, device=x.device)
    xd = x.to(draw_dtype)
    bound = 1 / math.sqrt(d)

    def draw(k):
        torch.manual_seed(seed + k)
        torch.nn.init.trunc_normal_(v, mean=0.0, std=1.0, a=-bound, b=bound)

    def project():
        out = torch.empty(K, device=x.device)
        for k in range(K):
            draw(k)
            out[k] = torch.dot(v, xd).float()
        return out

    def reconstruct():
        for k in range(K):
            draw(k)
            x.add_(v, alpha=1e-3 * float(gamma[k]))

    return project if op == "project" else reconstruct


def roofline(backend: str, dist: str, d: int, K: int, seed: int, device: str):
    impl = backends.module(backend)
    return lambda: impl.generate_sum(seed, K, d, dist, torch.device(device))
