"""Triton kernels, one file per op; imported only when the Triton backend is used."""

from .basis import basis_rows
from .project import project_segments
from .reconstruct import reconstruct_seeds

__all__ = ["basis_rows", "project_segments", "reconstruct_seeds"]
