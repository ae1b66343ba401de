// pybind11 module rnb_kernels._cpu: the CPU folds of csrc/cpu/, built with the host C++
// compiler only (no CUDA toolkit). Tensors cross as integer host pointers plus shapes; the
// Python wrappers in rnb_kernels/ops/cpu_fold.py check dtypes, strides and sizes first. The
// GIL is released while a fold runs. A null pointer (0) stands for an absent sign or keep.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/fold.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, mod) {
  mod.doc() = "rnb_kernels CPU folds (count-sketch index folds of the torch backend)";
  mod.def(
      "fold_columns",
      [](std::uintptr_t src, std::int64_t rows, std::int64_t k, std::int64_t ld,
         std::uintptr_t idx, std::uintptr_t sign, std::int64_t width, std::uintptr_t keep,
         std::int64_t n_keep, std::uintptr_t out, std::int64_t out_ld, int threads) {
        py::gil_scoped_release nogil;
        rnb_cpu::fold_columns(ptr<const float>(src), rows, k, ld, ptr<const std::int32_t>(idx),
                              ptr<const float>(sign), width, ptr<const std::int32_t>(keep),
                              n_keep, ptr<float>(out), out_ld, threads);
      },
      py::arg("src"), py::arg("rows"), py::arg("k"), py::arg("ld"), py::arg("idx"),
      py::arg("sign"), py::arg("width"), py::arg("keep"), py::arg("n_keep"), py::arg("out"),
      py::arg("out_ld"), py::arg("threads"));
  mod.def(
      "fold_flat",
      [](std::uintptr_t src, std::int64_t n, std::uintptr_t idx, std::uintptr_t out,
         std::int64_t width, int threads) {
        py::gil_scoped_release nogil;
        rnb_cpu::fold_flat(ptr<const float>(src), n, ptr<const std::int32_t>(idx),
                           ptr<float>(out), width, threads);
      },
      py::arg("src"), py::arg("n"), py::arg("idx"), py::arg("out"), py::arg("width"),
      py::arg("threads"));
  mod.def("openmp_symbol", &rnb_cpu::openmp_symbol,
          "address of omp_get_max_threads in this module's OpenMP runtime (0: built without)");
}
