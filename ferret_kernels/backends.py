"""Which implementation runs an op: Triton on CUDA, the C++ extension on CPU, torch otherwise."""

from __future__ import annotations

import importlib
import warnings
from functools import cache

import torch

from . import config, reference

BUILD_HINT = (
    "build it with `pip install -e .` (or `make test`) on a machine with a C++17 compiler; "
    "meanwhile backend='torch' gives the same bits, slower"
)


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
    """The concrete backend name for ``backend`` ("auto" and friends) on ``device``."""
    if backend is None:
        backend = "auto"
    if backend not in config.BACKENDS:
        raise ValueError(f"backend must be one of {config.BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = config.default_backend()
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_extension() is not None:
            return "cpu"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: `pip install triton`")
        if device.type != "cuda" and not (device.type == "cpu" and config.triton_interpret()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; move them with .cuda(), "
                "or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
            )
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if cpu_extension() is None:
            raise RuntimeError(f"backend='cpu' needs the C++ extension ferret_kernels._C: {BUILD_HINT}")
    return backend


def module(name: str):
    """The module implementing ops for a resolved backend name."""
    if name == "torch":
        return reference
    if name == "cpu":
        return importlib.import_module("ferret_kernels.cpu")
    return importlib.import_module("ferret_kernels.ops")
