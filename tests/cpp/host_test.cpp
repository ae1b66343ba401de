// Host-only checks of the index math the CUDA kernels run (csrc/sketch_hash.h, csrc/segments.h).
//
// Those headers hold host+device functions, so the exact code the kernels execute is compiled
// here by the host compiler (or by nvcc -x cu, which takes the __host__ __device__ path) and
// checked on machines without a GPU. tests/test_cuda_ops.py builds and drives this program:
//
//   host_test hash K_OUT K_IN K SEED LAYER   print bucket and sign of every (i, j), row-major
//   host_test hash_at K SEED LAYER I J ...   print bucket and sign of the listed (i, j) pairs
//   host_test segments                        self-check the segment walk; prints "ok N"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "segments.h"
#include "sketch_hash.h"

namespace {

int fail(const std::string& msg) {
  std::fprintf(stderr, "FAIL: %s\n", msg.c_str());
  return 1;
}

uint32_t u32(const char* s) { return uint32_t(std::strtoull(s, nullptr, 10)); }

void print_hash(uint32_t k, uint32_t seed, uint32_t layer, uint32_t i, uint32_t j) {
  const uint32_t h = rnb::sketch_hash(rnb::sketch_row_key(seed, layer, i), j);
  std::printf("%u %d\n", rnb::sketch_bucket(h, k), int(rnb::sketch_sign(h)));
}

// One simulated launch: the CTA walk of segmented_gemm.cuh with a scalar K_out x K_in product in
// place of the tensor-core tile, split into chunks of rows_per_cta rows, compared with direct
// per-domain sums. Integer-valued inputs keep every sum exact, so equality is exact.
int check_walk(int64_t n, int64_t m, int64_t rows_per_cta, int64_t bk, std::mt19937_64& rng,
               double ignore_share, int64_t domain_span) {
  const int64_t k_out = 2, k_in = 3;
  std::vector<int64_t> ids(static_cast<size_t>(n));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::uniform_int_distribution<int64_t> pick(0, std::max<int64_t>(domain_span, 1) - 1);
  for (auto& id : ids) id = u(rng) < ignore_share ? -1 : std::min(pick(rng), m - 1);
  std::vector<double> x(static_cast<size_t>(n * k_in)), dy(static_cast<size_t>(n * k_out));
  std::uniform_int_distribution<int> val(-3, 3);
  for (auto& v : x) v = val(rng);
  for (auto& v : dy) v = val(rng);

  // The launcher's layout: stable sort by id, bounds[s] = first sorted row with id >= s - 1.
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) order[size_t(r)] = r;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids[size_t(a)] < ids[size_t(b)]; });
  std::vector<int64_t> bounds(size_t(m + 2));
  for (int64_t s = 0; s < m + 2; ++s) {
    bounds[size_t(s)] = std::lower_bound(order.begin(), order.end(), s - 1,
                                         [&](int64_t row, int64_t v) { return ids[size_t(row)] < v; }) -
                        order.begin();
  }

  std::vector<double> acc(size_t(m * k_out * k_in), 0.0), dw(size_t(k_out * k_in), 0.0);
  const int64_t nseg = m + 1;
  const int64_t chunks = rnb::ceil_div(n, rows_per_cta);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c0 = c * rows_per_cta, c1 = std::min(c0 + rows_per_cta, n);
    std::vector<double> seg(size_t(k_out * k_in), 0.0), tot(size_t(k_out * k_in), 0.0);
    int64_t expect = c0;
    int64_t last_flushed_seg = -1;
    for (rnb::SegStep st = rnb::segment_step(bounds.data(), nseg, c0, c1, bk); st.valid();
         st = rnb::next_segment_step(bounds.data(), nseg, st, c1, bk)) {
      if (st.r0 != expect) return fail("steps are not contiguous");
      if (st.r1 - st.r0 > bk) return fail("step longer than bk");
      if (st.seg < 0 || st.seg >= nseg) return fail("segment out of range");
      if (st.r0 < bounds[size_t(st.seg)] || st.r1 > bounds[size_t(st.seg) + 1])
        return fail("step straddles a segment boundary");
      if (st.end != std::min(bounds[size_t(st.seg) + 1], c1)) return fail("wrong segment end");
      for (int64_t r = st.r0; r < st.r1; ++r) {
        const int64_t row = order[size_t(r)];
        if (ids[size_t(row)] != st.seg - 1) return fail("row of another domain in the step");
        for (int64_t i = 0; i < k_out; ++i)
          for (int64_t j = 0; j < k_in; ++j)
            seg[size_t(i * k_in + j)] += dy[size_t(row * k_out + i)] * x[size_t(row * k_in + j)];
      }
      expect = st.r1;
      if (st.flush()) {
        if (st.seg <= last_flushed_seg) return fail("segment flushed twice in one chunk");
        last_flushed_seg = st.seg;
        for (size_t e = 0; e < seg.size(); ++e) {
          if (st.seg > 0) acc[size_t(st.seg - 1) * seg.size() + e] += seg[e];
          tot[e] += seg[e];
          seg[e] = 0.0;
        }
      }
    }
    if (expect != c1) return fail("walk did not cover its chunk");
    for (double v : seg)
      if (v != 0.0) return fail("tile left unflushed at the end of a chunk");
    for (size_t e = 0; e < dw.size(); ++e) dw[e] += tot[e];
  }

  std::vector<double> ref_acc(acc.size(), 0.0), ref_dw(dw.size(), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k_out; ++i)
      for (int64_t j = 0; j < k_in; ++j) {
        const double p = dy[size_t(r * k_out + i)] * x[size_t(r * k_in + j)];
        ref_dw[size_t(i * k_in + j)] += p;
        if (ids[size_t(r)] >= 0) ref_acc[size_t(ids[size_t(r)] * k_out * k_in + i * k_in + j)] += p;
      }
  if (acc != ref_acc) return fail("per-domain sums differ from the direct sums");
  if (dw != ref_dw) return fail("dW differs from the direct sum");
  return 0;
}

int check_segments() {
  int cases = 0;
  // segment_containing on hand-made bounds with empty segments at the start, middle and end.
  const std::vector<int64_t> b = {0, 0, 3, 3, 3, 7, 8, 8};  // nseg = 7, n = 8
  const int64_t want[] = {1, 1, 1, 4, 4, 4, 4, 5};
  for (int64_t pos = 0; pos < 8; ++pos, ++cases)
    if (rnb::segment_containing(b.data(), 7, pos) != want[pos]) return fail("segment_containing");

  std::mt19937_64 rng(12345);
  const int64_t ns[] = {1, 2, 31, 32, 33, 37, 100, 1000};
  const int64_t ms[] = {1, 2, 3, 7, 64};
  const int64_t bks[] = {16, 32};
  for (int64_t n : ns)
    for (int64_t m : ms)
      for (int64_t bk : bks)
        for (int64_t rows : {n, int64_t(32), int64_t(64), bk})
          for (double ignore : {0.0, 0.3, 1.0})
            for (int64_t span : {int64_t(1), m, m * 2}) {  // one domain, all, skewed (ids > m clamp)
              if (int rc = check_walk(n, m, rows, bk, rng, ignore, span)) return rc;
              ++cases;
            }

  // Split policy: chunks are whole steps, fit gridDim.y, and only split when tiles are scarce.
  for (int64_t tiles : {1, 6, 100, 263, 264, 10000})
    for (int64_t n : {int64_t(1), int64_t(255), int64_t(256), int64_t(1000), int64_t(8192),
                      int64_t(1) << 20, int64_t(1) << 33})
      for (int64_t sms : {108, 132}) {
        const int64_t rows = rnb::wgrad_rows_per_cta(tiles, n, sms, 32);
        const int64_t chunks = rnb::ceil_div(n, rows);
        if (rows < 1 || chunks < 1 || chunks > 65535) return fail("split out of range");
        if (chunks > 1 && rows % 32 != 0) return fail("split chunk is not whole steps");
        if (chunks > 1 && rows < rnb::kMinRowsPerCta) return fail("split chunk too short");
        if (tiles >= 2 * sms && chunks != 1) return fail("split although tiles fill the GPU");
        ++cases;
      }
  std::printf("ok %d\n", cases);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 7 && std::strcmp(argv[1], "hash") == 0) {
    const uint32_t k_out = u32(argv[2]), k_in = u32(argv[3]), k = u32(argv[4]);
    const uint32_t seed = u32(argv[5]), layer = u32(argv[6]);
    for (uint32_t i = 0; i < k_out; ++i)
      for (uint32_t j = 0; j < k_in; ++j) print_hash(k, seed, layer, i, j);
    return 0;
  }
  if (argc >= 5 && std::strcmp(argv[1], "hash_at") == 0 && (argc - 5) % 2 == 0) {
    const uint32_t k = u32(argv[2]), seed = u32(argv[3]), layer = u32(argv[4]);
    for (int a = 5; a + 1 < argc; a += 2) print_hash(k, seed, layer, u32(argv[a]), u32(argv[a + 1]));
    return 0;
  }
  if (argc == 2 && std::strcmp(argv[1], "segments") == 0) return check_segments();
  std::fprintf(stderr, "usage: host_test hash K_OUT K_IN K SEED LAYER | hash_at K SEED LAYER I J... | segments\n");
  return 2;
}
