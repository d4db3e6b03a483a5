// The one pybind11 module of the package: ferret_kernels._C.
//
// Every op releases the GIL: they only touch tensor memory, and a training loop may run
// other Python threads meanwhile. ferret_kernels/cpu.py builds the segment and block
// tables these functions take; call them through it (or functional.py) rather than here.
#include <torch/extension.h>

#include "ferret_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ferret_kernels C++ CPU backend (see ferret_kernels/cpu.py)";
  m.attr("SEGMENT_COLUMNS") = static_cast<int>(ferret::kSegColumns);
  m.attr("BLOCK_COLUMNS") = static_cast<int>(ferret::kBlkColumns);

  m.def("basis_rows", &ferret::basis_rows, "float32 (K, d): V[k, i] = v_{block, k_begin + k}[offset + i]",
        py::arg("seed"), py::arg("K"), py::arg("d"), py::arg("block"), py::arg("offset"), py::arg("k_begin"),
        py::arg("distribution"), py::call_guard<py::gil_scoped_release>());
  m.def("project", &ferret::project,
        "float32 (total_count,): per-block V x over segments; int64 tables segments (S, 5) "
        "[tensor, start, n, block, j0] and blocks (L, 4) [count, block_id, coef_offset, k_begin]",
        py::arg("views"), py::arg("segments"), py::arg("blocks"), py::arg("total_count"), py::arg("seed"),
        py::arg("distribution"), py::call_guard<py::gil_scoped_release>());
  m.def("reconstruct_", &ferret::reconstruct_,
        "In place: each segment element += alpha * sum_seeds sum_i gamma[coef + i] * v_{k_begin + i}; blocks holds "
        "one group of L rows [count, block_id, coef_offset, k_begin] per seed",
        py::arg("views"), py::arg("segments"), py::arg("blocks"), py::arg("gamma"), py::arg("seeds"),
        py::arg("alpha"), py::arg("distribution"), py::call_guard<py::gil_scoped_release>());
  m.def("generate_sum", &ferret::generate_sum,
        "Generation-only roofline: sum of K bases x d elements of block 0 (no input read)", py::arg("seed"),
        py::arg("K"), py::arg("d"), py::arg("distribution"), py::call_guard<py::gil_scoped_release>());
  m.def("simd_target", &ferret::simd_target, "The target_clones variant this host runs");
}
