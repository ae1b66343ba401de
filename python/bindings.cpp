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
}
