"""Every environment variable ferret_kernels reads, read here and nowhere else.

FERRET_BACKEND    backend that ``backend="auto"`` resolves to when set
                  (one of triton, cpp, torch; cpu = cpp); unset: choose by device.
TRITON_INTERPRET  when "1", Triton kernels run in Triton's CPU interpreter, so
                  ``backend="triton"`` accepts CPU tensors (tests, no GPU).
"""

from __future__ import annotations

import os

# Accepted ``backend=`` values: "auto", the backend names, and "cpu" (an alias of "cpp",
# the name the C++ backend had first).
BACKENDS = ("auto", "triton", "cpp", "cpu", "torch")


def default_backend() -> str:
    value = os.environ.get("FERRET_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FERRET_BACKEND={value!r} is not a backend; use one of {BACKENDS}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
