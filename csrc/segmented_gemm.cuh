// Shared main loop of the segmented weight-gradient kernels (exact and sketch).
//
// dW = dyᵀ·x with dy [N, K_out] and x [N, K_in]: the GEMM's M is K_out, its N is K_in and its
// reduction runs over the N rows (tokens). Rows are visited in domain-sorted order through the
// permutation `order`, so a k-step gathers whole rows (each a contiguous, coalesced run of
// K_out / K_in elements) and the reduction dimension is grouped by domain.
//
// Each CTA (8 warps, each owning a 64 x 32 sub-tile) owns one 128 x 128 output tile and walks
// its range of sorted rows in steps that stay inside one segment (segments.h): at most 32 rows
// for 16-bit inputs, 16 for fp32, double-buffered in shared memory through cp.async. The
// tensor-core accumulator `seg` then always holds one domain's partial tile; when the segment
// ends it is handed to the caller's flush (RMW into acc[d], or count-sketch atomics) and added
// into a second register tile `tot` that becomes dW. The CTA owns its output tile for every
// domain, so without a row split the flush is a plain read-modify-write; with a split (layers
// too small to fill the GPU with output tiles) several CTAs share a tile and flush atomically.
//
// Tensor cores through WMMA: fp16/bf16 inputs use m16n16k16 with fp32 accumulation (products of
// 16-bit values are exact in fp32). fp32 inputs use m16n16k8 TF32 in the 3xTF32 scheme
// (a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with hi = tf32(v), lo = tf32(v - hi)), which keeps
// products to ~2^-21 relative instead of TF32's 2^-11 so fp32 callers get fp32-grade results.
#pragma once

#include <mma.h>

#include <cstdint>

#include "common.cuh"
#include "rnb_kernels.h"
#include "segments.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "rnb_kernels segmented kernels need sm_80 or newer (bf16/TF32 tensor cores): set RNB_CUDA_ARCHS"
#endif

namespace rnb {
namespace wg {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 128;  // K_out (output rows) per CTA
constexpr int kBN = 128;  // K_in (output columns) per CTA
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;
constexpr int kWM = kBM / kWarpsM;  // 64 output rows per warp
constexpr int kWN = kBN / kWarpsN;  // 32 output columns per warp
constexpr int kFM = kWM / 16;       // 16 x 16 accumulator fragments per warp, down
constexpr int kFN = kWN / 16;       // and across
static_assert(kBM == kBN, "both operand tiles share one load mapping");

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static constexpr int kK = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kK = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

// Sorted rows staged per step: two MMA k-slices, so a double-buffered stage of both operands
// fits the 48 KB of static shared memory for every dtype.
template <typename T>
constexpr int kBK = 2 * Mma<T>::kK;
// 16-byte vectors: the unit of global loads and shared stores.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));
// Row padding of 16 bytes: staggers the banks of consecutive k rows and keeps every fragment
// pointer 32-byte aligned (16 k-rows x 272 B, 8 k-rows x 528 B and every stage are multiples
// of 32 B).
template <typename T>
constexpr int kLd = kBM + kVec<T>;
template <typename T>
constexpr int kVecPerRow = kBM / kVec<T>;
template <typename T>
constexpr int kVecPerThread = kBK<T> * kVecPerRow<T> / kThreads;
static_assert(kBK<float> * kVecPerRow<float> % kThreads == 0, "stage must split over threads");
static_assert(kBK<__half> * kVecPerRow<__half> % kThreads == 0, "stage must split over threads");

template <typename T>
using Stage = T[kBK<T>][kLd<T>];

template <typename T>
struct alignas(128) Smem {
  Stage<T> a[2];  // dy rows: A = dyᵀ read column-major
  Stage<T> b[2];  // x rows: B = x read row-major
  alignas(128) float scratch[kWarps][16 * 16];  // per-warp fragment staging for flushes
};

// Pointers and sizes common to both kernels.
template <typename T>
struct Problem {
  const T* x;              // [n, k_in], row stride ldx
  const T* dy;             // [n, k_out], row stride ldy
  const int64_t* order;    // [n] original row of each sorted row
  const int64_t* bounds;   // [nseg + 1] segment offsets into the sorted rows
  int64_t n, k_in, k_out, ldx, ldy;
  int64_t nseg;            // num_domains + 1
  int64_t rows_per_cta;    // sorted rows walked by one CTA (>= n: no split)
  int tiles_n;             // output tiles across K_in
  bool vec_x, vec_dy;      // 16-byte loads are legal for this operand
  T* dw;                   // [k_out, k_in] contiguous, written when not split
  float* dw32;             // fp32 [k_out, k_in] atomically accumulated when split, else null
};

// Asynchronous 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool read) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = read ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most one group (the most recent) is still in flight.
__device__ __forceinline__ void cp_async_wait_prev() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

// Stages sorted rows [r0, r1) of one operand, columns [col0, col0 + kBM), into `dst`; rows past
// r1 and columns past ncols become zeros so they add nothing. Aligned operands go through
// cp.async (no register staging, so the accumulators keep the registers); others (odd widths
// or strides) fall back to element loads, which only odd shapes pay for.
template <typename T>
__device__ __forceinline__ void load_stage(Stage<T>& dst, const T* __restrict__ src, int64_t ld,
                                           int64_t ncols, int64_t col0,
                                           const int64_t* __restrict__ order, int64_t r0,
                                           int64_t r1, bool vec_ok) {
  constexpr int V = kVec<T>;
#pragma unroll
  for (int q = 0; q < kVecPerThread<T>; ++q) {
    const int v = threadIdx.x + q * kThreads;
    const int row = v / kVecPerRow<T>;
    const int cl = (v % kVecPerRow<T>) * V;
    const int64_t col = col0 + cl, r = r0 + row;
    T* d = &dst[row][cl];
    if (vec_ok) {
      // ncols and col are multiples of V here, so a vector is wholly in or out of range.
      const bool ok = r < r1 && col < ncols;
      cp_async16(d, ok ? src + order[r] * ld + col : src, ok);
    } else {
      uint4 bits = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0.0 in every float format
      if (r < r1) {
        const T* p = src + order[r] * ld + col;
        T* e = reinterpret_cast<T*>(&bits);
#pragma unroll
        for (int w = 0; w < V; ++w) {
          if (col + w < ncols) e[w] = p[w];
        }
      }
      *reinterpret_cast<uint4*>(d) = bits;
    }
  }
}

// acc[i][j] += A[warp rows, kk:kk+kK] · B[kk:kk+kK, warp cols] for one k-slice of a stage.
template <typename T>
__device__ __forceinline__ void mma_slice(typename Mma<T>::Acc (&acc)[kFM][kFN],
                                          const Stage<T>& a, const Stage<T>& b, int kk, int wm,
                                          int wn) {
  typename Mma<T>::FragA fa[kFM];
  typename Mma<T>::FragB fb[kFN];
#pragma unroll
  for (int i = 0; i < kFM; ++i) wmma::load_matrix_sync(fa[i], &a[kk][wm * kWM + i * 16], kLd<T>);
#pragma unroll
  for (int j = 0; j < kFN; ++j) wmma::load_matrix_sync(fb[j], &b[kk][wn * kWN + j * 16], kLd<T>);
#pragma unroll
  for (int i = 0; i < kFM; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
}

template <>
__device__ __forceinline__ void mma_slice<float>(Mma<float>::Acc (&acc)[kFM][kFN],
                                                 const Stage<float>& a, const Stage<float>& b,
                                                 int kk, int wm, int wn) {
  Mma<float>::FragA a_hi[kFM], a_lo[kFM];
  Mma<float>::FragB b_hi[kFN], b_lo[kFN];
#pragma unroll
  for (int i = 0; i < kFM; ++i) {
    wmma::load_matrix_sync(a_hi[i], &a[kk][wm * kWM + i * 16], kLd<float>);
#pragma unroll
    for (int t = 0; t < a_hi[i].num_elements; ++t) {
      const float v = a_hi[i].x[t];
      const float hi = wmma::__float_to_tf32(v);
      a_hi[i].x[t] = hi;
      a_lo[i].x[t] = wmma::__float_to_tf32(v - hi);
    }
  }
#pragma unroll
  for (int j = 0; j < kFN; ++j) {
    wmma::load_matrix_sync(b_hi[j], &b[kk][wn * kWN + j * 16], kLd<float>);
#pragma unroll
    for (int t = 0; t < b_hi[j].num_elements; ++t) {
      const float v = b_hi[j].x[t];
      const float hi = wmma::__float_to_tf32(v);
      b_hi[j].x[t] = hi;
      b_lo[j].x[t] = wmma::__float_to_tf32(v - hi);
    }
  }
  // Small cross terms first so they are not swallowed by the large one.
#pragma unroll
  for (int i = 0; i < kFM; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
      wmma::mma_sync(acc[i][j], a_lo[i], b_hi[j], acc[i][j]);
      wmma::mma_sync(acc[i][j], a_hi[i], b_lo[j], acc[i][j]);
      wmma::mma_sync(acc[i][j], a_hi[i], b_hi[j], acc[i][j]);
    }
}

// Calls visit(gi, gj, v, cols) for every in-range run of 4 consecutive elements of this warp's
// fragments: v = tile values at (gi, gj .. gj + 3), of which the first `cols` (1..4) are inside
// the output. Each run goes to exactly one lane and lanes 4t .. 4t + 3 cover one 64-byte row
// segment, so global accesses coalesce. kUnroll = 1 keeps register-hungry visitors (hashing)
// from being replicated; visitors that read memory want the loads of both runs in flight.
template <typename T, int kUnroll, typename Visit>
__device__ __forceinline__ void for_each_quad(const typename Mma<T>::Acc (&frag)[kFM][kFN],
                                              float* scratch, int64_t row0, int64_t col0,
                                              int64_t k_out, int64_t k_in, Visit&& visit) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kFM; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
      wmma::store_matrix_sync(scratch, frag[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll kUnroll
      for (int e = lane; e < 64; e += 32) {
        const int r = e / 4, c = (e % 4) * 4;
        const int64_t gi = row0 + i * 16 + r, gj = col0 + j * 16 + c;
        if (gi < k_out && gj < k_in) {
          const float4 v = *reinterpret_cast<const float4*>(&scratch[r * 16 + c]);
          visit(gi, gj, v, int(min64(k_in - gj, 4)));
        }
      }
      __syncwarp();  // the next fragment overwrites scratch
    }
}

__device__ __forceinline__ float quad_at(const float4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// The CTA's whole walk. `flush(domain, frag, scratch, row0, col0)` receives each finished
// per-domain tile (domain >= 0; the ignored rows of segment 0 go to dW only); the warp's
// `scratch` is free for it to stage fragments through.
template <typename T, typename Flush>
__device__ __forceinline__ void segmented_tile_walk(const Problem<T>& p, Flush&& flush) {
  using Acc = typename Mma<T>::Acc;
  constexpr int kK = Mma<T>::kK;
  __shared__ Smem<T> sm;

  const int64_t tm = blockIdx.x / p.tiles_n, tn = blockIdx.x % p.tiles_n;
  const int64_t m0 = tm * kBM, n0 = tn * kBN;
  const int64_t c0 = int64_t(blockIdx.y) * p.rows_per_cta;
  const int64_t c1 = min64(c0 + p.rows_per_cta, p.n);
  if (c0 >= c1) return;  // uniform over the CTA

  const int warp = threadIdx.x / 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t row0 = m0 + wm * kWM, col0 = n0 + wn * kWN;
  float* scratch = sm.scratch[warp];

  Acc seg[kFM][kFN], tot[kFM][kFN];
#pragma unroll
  for (int i = 0; i < kFM; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
      wmma::fill_fragment(seg[i][j], 0.f);
      wmma::fill_fragment(tot[i][j], 0.f);
    }

  // Two-stage pipeline: while stage `cur` feeds the tensor cores, the next step's rows stream
  // into the other stage.
  SegStep st = segment_step(p.bounds, p.nseg, c0, c1, kBK<T>);
  int cur = 0;
  if (st.valid()) {
    load_stage(sm.a[0], p.dy, p.ldy, p.k_out, m0, p.order, st.r0, st.r1, p.vec_dy);
    load_stage(sm.b[0], p.x, p.ldx, p.k_in, n0, p.order, st.r0, st.r1, p.vec_x);
  }
  cp_async_commit();
  while (st.valid()) {
    // The other stage was last read in the previous iteration, which ended in a barrier.
    const SegStep nx = next_segment_step(p.bounds, p.nseg, st, c1, kBK<T>);
    if (nx.valid()) {
      load_stage(sm.a[cur ^ 1], p.dy, p.ldy, p.k_out, m0, p.order, nx.r0, nx.r1, p.vec_dy);
      load_stage(sm.b[cur ^ 1], p.x, p.ldx, p.k_in, n0, p.order, nx.r0, nx.r1, p.vec_x);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning stage cur
    cp_async_wait_prev();
    __syncthreads();
    // Short steps (segment tails) skip the k-slice that holds only zero rows.
    const int slices = int(ceil_div(st.r1 - st.r0, kK));
#pragma unroll
    for (int s = 0; s < kBK<T> / kK; ++s) {
      if (s < slices) mma_slice<T>(seg, sm.a[cur], sm.b[cur], s * kK, wm, wn);
    }
    __syncthreads();  // stage cur is refilled next iteration
    if (st.flush()) {
      if (st.seg > 0) flush(st.seg - 1, seg, scratch, row0, col0);
#pragma unroll
      for (int i = 0; i < kFM; ++i)
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
#pragma unroll
          for (int t = 0; t < seg[i][j].num_elements; ++t) tot[i][j].x[t] += seg[i][j].x[t];
          wmma::fill_fragment(seg[i][j], 0.f);
        }
    }
    st = nx;
    cur ^= 1;
  }

  float* dw32 = p.dw32;
  T* dw = p.dw;
  const int64_t k_in = p.k_in;
  for_each_quad<T, 2>(tot, scratch, row0, col0, p.k_out, p.k_in,
                      [&](int64_t gi, int64_t gj, const float4& v, int cols) {
                        const int64_t at = gi * k_in + gj;
#pragma unroll
                        for (int w = 0; w < 4; ++w) {
                          if (w >= cols) break;
                          if (dw32 != nullptr) {
                            atomicAdd(dw32 + at + w, quad_at(v, w));
                          } else {
                            dw[at + w] = from_float<T>(quad_at(v, w));
                          }
                        }
                      });
}

// How a problem is laid out on the GPU; both kernels launch the same grid.
struct Plan {
  int tiles_n = 0;
  int64_t tiles = 0;
  int64_t rows_per_cta = 0;
  int64_t chunks = 0;
  bool split() const { return chunks > 1; }
};

inline Plan make_plan(int64_t n, int64_t k_in, int64_t k_out) {
  Plan pl;
  pl.tiles_n = int(ceil_div(k_in, kBN));
  pl.tiles = ceil_div(k_out, kBM) * pl.tiles_n;
  pl.rows_per_cta = wgrad_rows_per_cta(pl.tiles, n, sm_count(), kBK<__half>);
  pl.chunks = ceil_div(n, pl.rows_per_cta);
  return pl;
}

inline size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Arguments both kernels validate before any CUDA call, so bad calls fail without a device.
inline bool valid_problem(DType dtype, int64_t n, int64_t k_in, int64_t k_out, int64_t ldx,
                          int64_t ldy, int64_t num_domains) {
  const bool dtype_ok =
      dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  return dtype_ok && n >= 0 && k_in >= 0 && k_out >= 0 && num_domains >= 1 && ldx >= k_in &&
         ldy >= k_out;
}

template <typename T>
__global__ void __launch_bounds__(256) _wgrad_cast_kernel(const float* __restrict__ src,
                                                          T* __restrict__ dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<T>(src[i]);
}

// dW (in its dtype) from the fp32 split-K sum.
inline cudaError_t cast_workspace(DType dtype, const float* ws, void* dw, int64_t count,
                                  cudaStream_t stream) {
  const int64_t want = ceil_div(count, 256);
  const unsigned blocks = unsigned(min64(max64(want, 1), 8 * int64_t(sm_count())));
  if (dtype == DType::kFloat16) {
    _wgrad_cast_kernel<__half><<<blocks, 256, 0, stream>>>(ws, static_cast<__half*>(dw), count);
  } else {
    _wgrad_cast_kernel<__nv_bfloat16>
        <<<blocks, 256, 0, stream>>>(ws, static_cast<__nv_bfloat16*>(dw), count);
  }
  return cudaGetLastError();
}

template <typename T>
Problem<T> make_problem(const void* x, const void* dy, const int64_t* order,
                        const int64_t* bounds, int64_t n, int64_t k_in, int64_t k_out,
                        int64_t ldx, int64_t ldy, int64_t num_domains, const Plan& pl, void* dw,
                        float* dw32) {
  auto vec_ok = [](const void* ptr, int64_t ld, int64_t cols) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % kVec<T> == 0 &&
           cols % kVec<T> == 0;
  };
  Problem<T> p;
  p.x = static_cast<const T*>(x);
  p.dy = static_cast<const T*>(dy);
  p.order = order;
  p.bounds = bounds;
  p.n = n;
  p.k_in = k_in;
  p.k_out = k_out;
  p.ldx = ldx;
  p.ldy = ldy;
  p.nseg = num_domains + 1;
  p.rows_per_cta = pl.rows_per_cta;
  p.tiles_n = pl.tiles_n;
  p.vec_x = vec_ok(x, ldx, k_in);
  p.vec_dy = vec_ok(dy, ldy, k_out);
  p.dw = static_cast<T*>(dw);
  p.dw32 = dw32;
  return p;
}

// The fp32 buffer (elements) a launch needs for its split-K dW sum: 0 when the grid does not
// split the rows or dW is fp32 itself (then dW is the sum).
inline int64_t workspace_elems(DType dtype, int64_t n, int64_t k_in, int64_t k_out) {
  if (dtype == DType::kFloat32 || n <= 0 || k_in <= 0 || k_out <= 0) return 0;
  return make_plan(n, k_in, k_out).split() ? k_in * k_out : 0;
}

// Everything around the kernel launch that both ops share. `launch(plan, dw32)` starts the
// typed kernel; dW is zero-filled / finalised here.
template <typename Launch>
cudaError_t run_segmented(DType dtype, int64_t n, int64_t k_in, int64_t k_out, void* dw,
                          float* workspace, int64_t workspace_len, cudaStream_t stream,
                          Launch&& launch) {
  if (k_in == 0 || k_out == 0) return cudaSuccess;
  const int64_t count = k_in * k_out;
  if (n == 0) return cudaMemsetAsync(dw, 0, size_t(count) * dtype_size(dtype), stream);
  const Plan pl = make_plan(n, k_in, k_out);
  if (pl.tiles > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  float* dw32 = nullptr;
  if (pl.split()) {
    dw32 = dtype == DType::kFloat32 ? static_cast<float*>(dw) : workspace;
    if (dw32 == nullptr || (dtype != DType::kFloat32 && workspace_len < count))
      return cudaErrorInvalidValue;
    cudaError_t err = cudaMemsetAsync(dw32, 0, size_t(count) * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = launch(pl, dw32);
  if (err != cudaSuccess || !pl.split() || dtype == DType::kFloat32) return err;
  return cast_workspace(dtype, dw32, dw, count, stream);
}

}  // namespace wg
}  // namespace rnb
