// Lets index/hash math be shared verbatim by device kernels and host-only test programs:
// the same function body compiles under nvcc (callable from both sides) and under g++.
#pragma once

#if defined(__CUDACC__)
#define RNB_HD __host__ __device__ __forceinline__
#else
#define RNB_HD inline
#endif

#include <cstdint>

namespace rnb {

RNB_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
RNB_HD constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
RNB_HD constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace rnb
