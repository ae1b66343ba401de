// pybind11 module rnb_kernels._C: thin, typed entry points over csrc/.
//
// Tensors cross as integer device pointers plus shapes/strides; the Python wrappers in
// rnb_kernels/ops/cuda.py validate everything before calling in. Every launch is checked and a
// CUDA error becomes a RuntimeError naming the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "rnb_kernels.h"

namespace py = pybind11;

#ifndef RNB_CUDA_ARCHS
#define RNB_CUDA_ARCHS ""
#endif

namespace {

void check(cudaError_t err, const char* kernel) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rnb_kernels CUDA kernel '") + kernel +
                             "' failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

std::vector<std::string> built_archs() {
  std::vector<std::string> out;
  std::string s = RNB_CUDA_ARCHS, cur;
  for (char c : s) {
    if (c == ';' || c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "rnb_kernels CUDA kernels (framework-free; pointers in, errors as exceptions)";
  mod.def("built_archs", &built_archs,
          "SM architectures (e.g. ['80', '90']) this module was compiled for");
  mod.def("cuda_runtime_version", []() { return int(CUDART_VERSION); },
          "CUDA runtime version the module was compiled against (e.g. 13000)");
  mod.def(
      "gram",
      [](std::uintptr_t a, std::uintptr_t b, int dtype, int64_t m, int64_t r, int64_t p,
         int64_t lda, int64_t ldb, bool symmetric, std::uintptr_t out, std::uintptr_t stream) {
        check(rnb::gram_launch(ptr<const void>(a), ptr<const void>(b), rnb::DType(dtype), m, r,
                               p, lda, ldb, symmetric, ptr<double>(out), stream_of(stream)),
              "gram");
      },
      py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("m"), py::arg("r"), py::arg("p"),
      py::arg("lda"), py::arg("ldb"), py::arg("symmetric"), py::arg("out"), py::arg("stream"),
      "out[m, r] (float64) = A[m, p] . B[r, p]^T; symmetric computes the upper triangle only");
  mod.def(
      "segmented_workspace_elems",
      [](int dtype, int64_t n, int64_t k_in, int64_t k_out) {
        return rnb::segmented_workspace_elems(rnb::DType(dtype), n, k_in, k_out);
      },
      py::arg("dtype"), py::arg("n"), py::arg("k_in"), py::arg("k_out"),
      "fp32 elements of split-K workspace segmented_wgrad / domain_sketch need on the current "
      "device (0: pass workspace=0)");
  mod.def(
      "segmented_wgrad",
      [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t order, std::uintptr_t bounds,
         int dtype, int64_t n, int64_t k_in, int64_t k_out, int64_t ldx, int64_t ldy,
         int64_t num_domains, std::uintptr_t acc, std::uintptr_t dw, std::uintptr_t workspace,
         int64_t workspace_len, std::uintptr_t stream) {
        check(rnb::segmented_wgrad_launch(
                  ptr<const void>(x), ptr<const void>(dy), ptr<const int64_t>(order),
                  ptr<const int64_t>(bounds), rnb::DType(dtype), n, k_in, k_out, ldx, ldy,
                  num_domains, ptr<float>(acc), ptr<void>(dw), ptr<float>(workspace),
                  workspace_len, stream_of(stream)),
              "segmented_wgrad");
      },
      py::arg("x"), py::arg("dy"), py::arg("order"), py::arg("bounds"), py::arg("dtype"),
      py::arg("n"), py::arg("k_in"), py::arg("k_out"), py::arg("ldx"), py::arg("ldy"),
      py::arg("num_domains"), py::arg("acc"), py::arg("dw"), py::arg("workspace"),
      py::arg("workspace_len"), py::arg("stream"),
      "dw[k_out, k_in] = dy^T x over all rows; acc[d] (fp32) += dy^T x over the rows of domain "
      "d, rows taken in `order` with segment offsets `bounds` [num_domains + 2]");
  mod.def(
      "domain_sketch",
      [](std::uintptr_t x, std::uintptr_t dy, std::uintptr_t order, std::uintptr_t bounds,
         int dtype, int64_t n, int64_t k_in, int64_t k_out, int64_t ldx, int64_t ldy,
         int64_t num_domains, std::uintptr_t sketch, int64_t sketch_dim, uint32_t seed,
         uint32_t layer, uint32_t row_offset, std::uintptr_t dw, std::uintptr_t workspace,
         int64_t workspace_len, std::uintptr_t stream) {
        check(rnb::domain_sketch_launch(
                  ptr<const void>(x), ptr<const void>(dy), ptr<const int64_t>(order),
                  ptr<const int64_t>(bounds), rnb::DType(dtype), n, k_in, k_out, ldx, ldy,
                  num_domains, ptr<float>(sketch), sketch_dim, seed, layer, row_offset,
                  ptr<void>(dw), ptr<float>(workspace), workspace_len, stream_of(stream)),
              "domain_sketch");
      },
      py::arg("x"), py::arg("dy"), py::arg("order"), py::arg("bounds"), py::arg("dtype"),
      py::arg("n"), py::arg("k_in"), py::arg("k_out"), py::arg("ldx"), py::arg("ldy"),
      py::arg("num_domains"), py::arg("sketch"), py::arg("sketch_dim"), py::arg("seed"),
      py::arg("layer"), py::arg("row_offset"), py::arg("dw"), py::arg("workspace"),
      py::arg("workspace_len"), py::arg("stream"),
      "dw[k_out, k_in] = dy^T x over all rows; sketch[d] (fp32 [num_domains, sketch_dim]) += "
      "count-sketch of domain d's dy^T x under the (seed, layer) hash, row i hashed as global "
      "row row_offset + i");
  // Lets the Python launcher tell this build from ones whose domain_sketch has no row_offset.
  mod.attr("DOMAIN_SKETCH_ROW_OFFSET") = true;
}
