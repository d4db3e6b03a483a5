"""The Triton backend: one file per op, the RNG contract as device functions in
``_rng.py`` and the host-side launch preparation in ``_launch.py``. Imported only when
the Triton backend is used."""

from .basis import basis_rows
from .generate import generate_sum
from .project import project_segments
from .reconstruct import reconstruct_seeds

__all__ = ["basis_rows", "generate_sum", "project_segments", "reconstruct_seeds"]
