// Gram products G = A·Bᵀ over per-domain gradient rows, float64 result.
//
// One streaming pass over the columns: blockIdx.y owns a contiguous column chunk, blockIdx.x
// one 64x64 output tile. Products are summed in fp32 over 1024-column spans and then folded
// into fp64 registers, so rounding error stays that of short fp32 sums however long P is.
// Partial tiles are combined with fp64 atomics (the output is tiny: m, r <= a few hundred).
#include "common.cuh"
#include "rnb_kernels.h"

namespace rnb {
namespace {

constexpr int kTile = 64;      // output tile edge
constexpr int kBK = 32;        // columns staged in shared memory per step
constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 sub-tile
constexpr int kFoldEvery = 32; // steps of kBK columns summed in fp32 before folding to fp64

template <typename T>
__global__ void __launch_bounds__(kThreads)
    _gram_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t m, int64_t r,
                 int64_t p, int64_t lda, int64_t ldb, int64_t chunk, int tiles_r,
                 bool symmetric, double* __restrict__ out) {
  const int ti = blockIdx.x / tiles_r;
  const int tj = blockIdx.x % tiles_r;
  if (symmetric && tj < ti) return;
  const int64_t row0 = int64_t(ti) * kTile, col0 = int64_t(tj) * kTile;
  const int64_t p_begin = int64_t(blockIdx.y) * chunk;
  const int64_t p_end = p_begin + chunk < p ? p_begin + chunk : p;
  if (p_begin >= p_end) return;

  // Stored k-major (+1 pad) so the inner loop reads consecutive rows without bank conflicts.
  __shared__ float sa[kBK][kTile + 1];
  __shared__ float sb[kBK][kTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  float acc32[4][4] = {};
  double acc64[4][4] = {};
  int steps = 0;
  for (int64_t k0 = p_begin; k0 < p_end; k0 += kBK) {
    // 64 rows x 32 columns per operand: 8 loads a thread, consecutive threads on consecutive
    // columns so each row segment is one coalesced transaction.
#pragma unroll
    for (int it = 0; it < (kTile * kBK) / kThreads; ++it) {
      const int idx = it * kThreads + tid;
      const int rr = idx / kBK, kk = idx % kBK;
      const int64_t col = k0 + kk;
      const bool col_ok = col < p_end;
      const int64_t ga = row0 + rr, gb = col0 + rr;
      sa[kk][rr] = (col_ok && ga < m) ? to_float(a[ga * lda + col]) : 0.f;
      sb[kk][rr] = (col_ok && gb < r) ? to_float(b[gb * ldb + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      float fa[4], fb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) fa[i] = sa[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) fb[j] = sb[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc32[i][j] = fmaf(fa[i], fb[j], acc32[i][j]);
    }
    __syncthreads();
    if (++steps == kFoldEvery) {
      steps = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc64[i][j] += double(acc32[i][j]);
          acc32[i][j] = 0.f;
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gi = row0 + ty + 16 * i, gj = col0 + tx + 16 * j;
      if (gi < m && gj < r) atomicAdd(&out[gi * r + gj], acc64[i][j] + double(acc32[i][j]));
    }
}

template <typename T>
cudaError_t launch_typed(const void* a, const void* b, int64_t m, int64_t r, int64_t p,
                         int64_t lda, int64_t ldb, bool symmetric, double* out,
                         cudaStream_t stream) {
  const int tiles_m = int(ceil_div(m, kTile)), tiles_r = int(ceil_div(r, kTile));
  const int64_t tiles = int64_t(tiles_m) * tiles_r;
  // Enough column chunks to give every SM a few blocks, each chunk a whole number of steps.
  const int64_t want = ceil_div(4 * int64_t(sm_count()), tiles);
  int64_t chunks = want < ceil_div(p, kBK) ? want : ceil_div(p, kBK);
  if (chunks < 1) chunks = 1;
  if (chunks > 65535) chunks = 65535;
  const int64_t chunk = ceil_div(ceil_div(p, chunks), kBK) * kBK;
  chunks = ceil_div(p, chunk);
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(chunks));
  _gram_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a),
                                                  static_cast<const T*>(b), m, r, p, lda, ldb,
                                                  chunk, tiles_r, symmetric, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gram_launch(const void* a, const void* b, DType dtype, int64_t m, int64_t r,
                        int64_t p, int64_t lda, int64_t ldb, bool symmetric, double* out,
                        cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(out, 0, sizeof(double) * size_t(m) * size_t(r), stream);
  if (err != cudaSuccess || m == 0 || r == 0 || p == 0) return err;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(a, b, m, r, p, lda, ldb, symmetric, out, stream);
    case DType::kFloat16:
      return launch_typed<__half>(a, b, m, r, p, lda, ldb, symmetric, out, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, b, m, r, p, lda, ldb, symmetric, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rnb
