"""Backends: who runs an op, found by name.

| name     | module                 | runs on                                        |
|----------|------------------------|------------------------------------------------|
| "torch"  | ``backends.reference`` | any device: the executable contract, slow      |
| "cpp"    | ``backends.cpp``       | CPU tensors: the compiled ``ferret_kernels._C`` |
| "triton" | ``backends.triton``    | CUDA tensors (CPU ones under TRITON_INTERPRET=1) |

``"cpu"`` is an alias of ``"cpp"``; ``"auto"`` picks Triton on CUDA, C++ on CPU when it
is built, torch otherwise. Every backend is a module that satisfies ``Backend``;
``functional.py`` checks the arguments, builds the layout tables and calls it.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache
from typing import Protocol

import torch

from .. import config
from ..layout import BlockLayout, SegmentTable

NAMES = ("torch", "cpp", "triton")
ALIASES = {"cpu": "cpp"}
_MODULES = {
    "torch": "ferret_kernels.backends.reference",
    "cpp": "ferret_kernels.backends.cpp",
    "triton": "ferret_kernels.backends.triton",
}

BUILD_HINT = (
    "build it with `pip install -e .` (or `make test`) on a machine with a C++17 compiler; "
    "meanwhile backend='torch' gives the same bits, slower"
)


class Backend(Protocol):
    """What a backend provides. Arguments arrive checked (functional.py); tensors share
    one device; ``views`` are flat contiguous float32/bfloat16/float16 tensors laid end
    to end as ``cut`` describes; seeds are uint64 ints; distribution is one of
    ``rng.DISTRIBUTIONS``. Bits: ``basis_rows`` and ``reconstruct_seeds`` are exactly
    those of docs/rng.md; ``project_segments`` is float32, the same on every call."""

    def basis_rows(self, seed: int, K: int, d: int, block: int, offset: int, k_begin: int, distribution: str,
                   device: torch.device) -> torch.Tensor:
        """float32 (K, d) on ``device``: row k is basis k_begin + k of ``block``, elements
        offset .. offset + d - 1."""

    def project_segments(self, views: list[torch.Tensor], cut: SegmentTable, layout: BlockLayout, seed: int,
                         distribution: str) -> torch.Tensor:
        """float32 (layout.total_count,) on the views' device: block l's V_l x_l at
        ``layout.coef_offsets[l]``."""

    def reconstruct_seeds(self, views: list[torch.Tensor], cut: SegmentTable, layouts: list[BlockLayout],
                          gamma: torch.Tensor, seeds: list[int], alpha: float, distribution: str,
                          k_begins: list[list[int] | None] | None = None) -> None:
        """In place: every element += alpha * sum over seeds g (in order) and bases i
        (ascending) of gamma[layouts[g].coef_offsets[l] + i] * v_{k_begins[g][l] + i},
        accumulated in float32 and rounded once. ``gamma`` float32 on the views' device."""

    def generate_sum(self, seed: int, K: int, d: int, distribution: str, device: torch.device) -> float:
        """Sum of bases 0..K-1 of block 0 over elements 0..d-1: generation alone (no input
        read), for the benchmarks' roofline; summed in any order."""


def canonical(name: str) -> str:
    """The backend name ``name`` stands for (aliases resolved); "auto" stays "auto"."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in NAMES:
        raise ValueError(f"backend must be one of {config.BACKENDS}; got {name!r}")
    return name


@cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@cache
def cpu_extension():
    """The compiled ``ferret_kernels._C`` module, or None (warned about once)."""
    try:
        return importlib.import_module("ferret_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"ferret_kernels: the C++ CPU backend is not built ({exc}); CPU tensors use the torch "
            f"reference backend. To get the fast CPU backend, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend name (one of ``NAMES``) that ``backend`` ("auto", an alias or a name)
    runs as on ``device``; raises when it cannot run there."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in config.BACKENDS:
        raise ValueError(f"backend must be one of {config.BACKENDS}; got {backend!r}")
    backend = canonical(backend)
    if backend == "auto":
        backend = canonical(config.default_backend())
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_extension() is not None:
            return "cpp"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: `pip install triton`")
        if device.type != "cuda" and not (device.type == "cpu" and config.triton_interpret()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; move them with .cuda(), "
                "or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
            )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' (alias 'cpu') needs CPU tensors, got tensors on {device}")
        if cpu_extension() is None:
            raise RuntimeError(f"backend='cpp' (alias 'cpu') needs the C++ extension ferret_kernels._C: {BUILD_HINT}")
    return backend


def module(name: str) -> Backend:
    """The module implementing backend ``name`` (a name from ``NAMES`` or an alias)."""
    name = canonical(name)
    if name == "auto":
        raise ValueError("module() needs a concrete backend; resolve 'auto' first with resolve(name, device)")
    return importlib.import_module(_MODULES[name])


def get(backend: str | None, device: torch.device) -> Backend:
    """``module(resolve(backend, device))``."""
    return module(resolve(backend, device))
