// Bookkeeping of the segmented weight-gradient kernels: how a CTA walks the domain-sorted rows.
//
// Rows are sorted by domain id (ignored -1 rows first) and `bounds[s] .. bounds[s + 1]` holds
// segment s: s = 0 the ignored rows, s = d + 1 domain d. A CTA walks a contiguous range
// [c0, c1) of sorted rows (the whole of them unless the row stream is split across CTAs) in
// steps of at most `bk` rows that never straddle a segment, so one register tile always holds
// one domain's partial product and can be flushed when its segment (clipped to the range)
// ends. Everything here is host+device so tests/cpp/host_test.cpp checks the very code the
// kernels run.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace rnb {

struct SegStep {
  int64_t r0;   // first sorted row of the step
  int64_t r1;   // one past its last row; r0 == r1 marks the end of the walk
  int64_t end;  // end of the step's segment, clipped to the CTA's range
  int64_t seg;  // 0: ignored rows, d + 1: domain d

  RNB_HD bool valid() const { return r0 < r1; }
  // The register tile holds the whole (clipped) segment after this step: flush it.
  RNB_HD bool flush() const { return r1 == end; }
};

// Largest s in [0, nseg) with bounds[s] <= pos, i.e. the segment holding row pos when
// bounds[0] <= pos < bounds[nseg]. Skips empty segments by construction (bounds are
// non-decreasing, so an empty segment s has bounds[s] == bounds[s + 1] and loses to s + 1).
RNB_HD int64_t segment_containing(const int64_t* bounds, int64_t nseg, int64_t pos) {
  int64_t lo = 0, hi = nseg - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (bounds[mid] <= pos) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The step starting at sorted row pos of a CTA whose range ends at c1.
RNB_HD SegStep segment_step(const int64_t* bounds, int64_t nseg, int64_t pos, int64_t c1,
                            int64_t bk) {
  if (pos >= c1) return SegStep{pos, pos, pos, -1};
  const int64_t s = segment_containing(bounds, nseg, pos);
  const int64_t end = min64(bounds[s + 1], c1);
  // Malformed bounds (end <= pos) end the walk instead of looping forever.
  if (end <= pos) return SegStep{pos, pos, pos, -1};
  return SegStep{pos, min64(pos + bk, end), end, s};
}

RNB_HD SegStep next_segment_step(const int64_t* bounds, int64_t nseg, const SegStep& cur,
                                 int64_t c1, int64_t bk) {
  if (cur.r1 < cur.end) return SegStep{cur.r1, min64(cur.r1 + bk, cur.end), cur.end, cur.seg};
  return segment_step(bounds, nseg, cur.r1, c1, bk);
}

// Fewest sorted rows a CTA walks when the row stream is split: below this the per-split
// flushes (atomics over a whole output tile) cost more than the parallelism gains.
constexpr int64_t kMinRowsPerCta = 256;

// Rows of the sorted stream per CTA (>= n means no split). Output tiles alone fill the GPU for
// large layers; for small ones (tiles < 2 per SM) the row stream is cut into chunks, a whole
// number of bk-row steps each, so that every SM gets about two CTAs.
inline int64_t wgrad_rows_per_cta(int64_t tiles, int64_t n, int64_t sms, int64_t bk) {
  if (n <= 0 || tiles <= 0) return n > 0 ? n : 1;
  int64_t chunks = ceil_div(2 * sms, tiles);
  chunks = min64(chunks, max64(n / kMinRowsPerCta, 1));
  chunks = min64(chunks, 65535);  // gridDim.y limit
  if (chunks <= 1) return n;
  const int64_t rows = ceil_div(ceil_div(n, chunks), bk) * bk;
  return rows;
}

}  // namespace rnb
