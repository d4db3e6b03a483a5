"""Backends under test: torch always; Triton on CUDA, or in its CPU interpreter when no
GPU is present (TRITON_INTERPRET must be set before triton is imported); C++ when built."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ferret_kernels import backends  # noqa: E402


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run here."""
    pairs = [("torch", "cpu")]
    if backends.triton_available():
        if torch.cuda.is_available():
            pairs.append(("triton", "cuda"))
        elif os.environ.get("TRITON_INTERPRET") == "1":
            pairs.append(("triton", "cpu"))
    try:
        import ferret_kernels._C  # noqa: F401

        pairs.append(("cpp", "cpu"))
    except ImportError:
        pass
    return pairs


BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
def backend_device(request):
    return request.param


FAST = [(b, d) for b, d in BACKENDS if b != "torch"]


@pytest.fixture(params=FAST, ids=[f"{b}-{d}" for b, d in FAST])
def fast_backend_device(request):
    return request.param
