#include "fold.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNB_CPU_X86 1
#include <immintrin.h>
#endif

namespace rnb_cpu {
namespace {

// Rows folded together: one index read serves 8 rows, and a column's 8 adds hit one 32-byte
// line of the bucket-major scratch (one AVX2 register).
constexpr std::int64_t kRowBlock = 8;

// Below this many input floats a parallel region costs more than it saves (a wake-up of the
// workers is tens of microseconds when they sleep).
constexpr std::int64_t kMinParallelElems = std::int64_t{1} << 18;

// fold_flat's chunks (see there): few enough that their partial sums stay small and are added
// in a blink.
constexpr std::int64_t kMaxFlatChunks = 8;
constexpr std::int64_t kMaxFlatPartialBytes = std::int64_t{8} << 20;

struct Fold {
  const float* src;
  std::int64_t k, ld;
  const std::int32_t* idx;
  const float* sign;
  std::int64_t width;
  const std::int32_t* keep;
  std::int64_t n_keep;
  float* out;
  std::int64_t out_ld;
};

void keep_columns(const Fold& f, std::int64_t r0, std::int64_t r1) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* s = f.src + r * f.ld;
    float* o = f.out + r * f.out_ld + f.width;
    for (std::int64_t q = 0; q < f.n_keep; ++q) o[q] = s[f.keep[q]];
  }
}

// Rows [r0, r1) one at a time: the remainder of the blocked loops, and every row on CPUs
// without AVX2.
void fold_rows_scalar(const Fold& f, std::int64_t r0, std::int64_t r1) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* s = f.src + r * f.ld;
    float* o = f.out + r * f.out_ld;
    std::memset(o, 0, sizeof(float) * static_cast<std::size_t>(f.width));
    if (f.sign != nullptr) {
      for (std::int64_t j = 0; j < f.k; ++j) o[f.idx[j]] += f.sign[j] * s[j];
    } else {
      for (std::int64_t j = 0; j < f.k; ++j) o[f.idx[j]] += s[j];
    }
  }
  keep_columns(f, r0, r1);
}

#ifdef RNB_CPU_X86
// In-register transpose of an 8 x 8 float block held in r[0..7].
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// One block of 8 rows starting at row r: 8 x 8 tiles of src are transposed in registers, so
// column j of the block is one register added (times its sign) to bucket idx[j] of the
// [width][8] scratch acc, which is transposed back into the 8 output rows at the end.
template <bool kSigned>
__attribute__((target("avx2"))) void fold_block_avx2(const Fold& f, std::int64_t r, float* acc,
                                                     std::int64_t wpad) {
  std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(wpad * kRowBlock));
  const float* s = f.src + r * f.ld;
  const std::int64_t kv = f.k / 8 * 8;
  __m256 v[8];
  for (std::int64_t j = 0; j < kv; j += 8) {
    for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(s + i * f.ld + j);
    transpose8(v);  // v[c] = column j + c of the 8 rows
    for (int c = 0; c < 8; ++c) {
      float* a = acc + static_cast<std::int64_t>(f.idx[j + c]) * kRowBlock;
      // A multiply by +-1 is exact, so signed and unsigned folds round alike.
      const __m256 x = kSigned ? _mm256_mul_ps(v[c], _mm256_set1_ps(f.sign[j + c])) : v[c];
      _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), x));
    }
  }
  for (std::int64_t j = kv; j < f.k; ++j) {
    float* a = acc + static_cast<std::int64_t>(f.idx[j]) * kRowBlock;
    const float sj = kSigned ? f.sign[j] : 1.0f;
    for (int i = 0; i < 8; ++i) a[i] += sj * s[i * f.ld + j];
  }
  // acc is [wpad][8]: transpose 8 buckets at a time into the 8 output rows.
  float* o = f.out + r * f.out_ld;
  const std::int64_t wv = f.width / 8 * 8;
  for (std::int64_t b = 0; b < wv; b += 8) {
    for (int i = 0; i < 8; ++i) v[i] = _mm256_load_ps(acc + (b + i) * kRowBlock);
    transpose8(v);  // v[i] = buckets b..b+7 of row i
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + i * f.out_ld + b, v[i]);
  }
  for (std::int64_t b = wv; b < f.width; ++b)
    for (int i = 0; i < 8; ++i) o[i * f.out_ld + b] = acc[b * kRowBlock + i];
  // The block's rows were just read, so the kept columns come from cache.
  keep_columns(f, r, r + kRowBlock);
}

// Row blocks [b0, b1), with a scratch of the calling thread.
__attribute__((target("avx2"))) void fold_blocks_avx2(const Fold& f, std::int64_t b0,
                                                      std::int64_t b1) {
  const std::int64_t wpad = (f.width + 7) / 8 * 8;
  std::vector<float> scratch(static_cast<std::size_t>(wpad * kRowBlock + 8));
  // 32-byte aligned start for the aligned loads and stores of fold_block_avx2.
  float* acc = scratch.data() + ((32 - reinterpret_cast<std::uintptr_t>(scratch.data()) % 32) %
                                 32) / sizeof(float);
  for (std::int64_t b = b0; b < b1; ++b) {
    if (f.sign != nullptr) {
      fold_block_avx2<true>(f, b * kRowBlock, acc, wpad);
    } else {
      fold_block_avx2<false>(f, b * kRowBlock, acc, wpad);
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// The full 8-row blocks [b0, b1) by the best loop this CPU has.
void fold_blocks(const Fold& f, std::int64_t b0, std::int64_t b1) {
#ifdef RNB_CPU_X86
  if (has_avx2()) {
    fold_blocks_avx2(f, b0, b1);
    return;
  }
#endif
  fold_rows_scalar(f, b0 * kRowBlock, b1 * kRowBlock);
}

}  // namespace

void fold_columns(const float* src, std::int64_t rows, std::int64_t k, std::int64_t ld,
                  const std::int32_t* idx, const float* sign, std::int64_t width,
                  const std::int32_t* keep, std::int64_t n_keep, float* out,
                  std::int64_t out_ld, int threads) {
  if (rows <= 0 || width + n_keep <= 0) return;
  const Fold f{src, k, ld, idx, sign, width, keep, n_keep, out, out_ld};
  const std::int64_t blocks = rows / kRowBlock;
#ifdef _OPENMP
  if (threads > 1 && blocks > 1 && rows * k >= kMinParallelElems) {
    // Contiguous ranges of blocks per thread; every row's sums are the same as one thread's.
#pragma omp parallel num_threads(threads)
    {
      const std::int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
      fold_blocks(f, blocks * t / n, blocks * (t + 1) / n);
    }
  } else {
    fold_blocks(f, 0, blocks);
  }
#else
  (void)threads;
  fold_blocks(f, 0, blocks);
#endif
  fold_rows_scalar(f, blocks * kRowBlock, rows);
}

void fold_flat(const float* src, std::int64_t n, const std::int32_t* idx, float* out,
               std::int64_t width, int threads) {
  if (width <= 0) return;
  // Chunks of at least kMinParallelElems elements, at most kMaxFlatChunks of them, and their
  // partial sums within kMaxFlatPartialBytes: a function of n and width alone.
  std::int64_t chunks = std::min<std::int64_t>(n / kMinParallelElems, kMaxFlatChunks);
  chunks = std::min<std::int64_t>(
      chunks, kMaxFlatPartialBytes / (width * static_cast<std::int64_t>(sizeof(float))));
  if (chunks <= 1) {
    std::memset(out, 0, sizeof(float) * static_cast<std::size_t>(width));
    for (std::int64_t i = 0; i < n; ++i) out[idx[i]] += src[i];
    return;
  }
  std::vector<float> part(static_cast<std::size_t>(chunks * width));
  auto fold_chunk = [&](std::int64_t c) {
    float* p = part.data() + c * width;
    std::memset(p, 0, sizeof(float) * static_cast<std::size_t>(width));
    const std::int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
    for (std::int64_t i = lo; i < hi; ++i) p[idx[i]] += src[i];
  };
  auto add_chunks = [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) {
      float v = part[static_cast<std::size_t>(b)];
      for (std::int64_t c = 1; c < chunks; ++c) v += part[static_cast<std::size_t>(c * width + b)];
      out[b] = v;
    }
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (std::int64_t c = 0; c < chunks; ++c) fold_chunk(c);
      const std::int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      add_chunks(width * t / nt, width * (t + 1) / nt);  // after the loop's implicit barrier
    }
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t c = 0; c < chunks; ++c) fold_chunk(c);
  add_chunks(0, width);
}

std::uintptr_t openmp_symbol() {
#ifdef _OPENMP
  return reinterpret_cast<std::uintptr_t>(&omp_get_max_threads);
#else
  return 0;
#endif
}

}  // namespace rnb_cpu
