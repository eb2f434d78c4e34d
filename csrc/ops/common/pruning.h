// Per-element logic of the pruning ops (BUS TSPS, Sec. 3.2), shared by the CPU and the CUDA kernels.
//
// Everything here is an inline __host__ __device__ function on floats and integers, so the CPU
// implementation (which the CPU tests run) executes exactly the code the GPU kernels execute:
//   * top-k selection: order-preserving float -> uint32 keys, a 4-pass radix select of the k-th
//     largest key, ties broken by position (lower position kept first);
//   * the fused token: sum_{j dropped} s_j x_j / max(sum_{j dropped} s_j, eps) and its gradients;
//   * the text-patch softmax: an online log-sum-exp that merges partial (max, sum) pairs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BUS_HD __host__ __device__ __forceinline__
#else
#define BUS_HD inline
#endif

namespace bus {

// Denominator floor of the fused token; equal to bus_kernels.reference.pruning.FUSE_EPS.
constexpr float kFuseEps = 1e-6f;

// Radix select: 8-bit digits, 4 passes over 32-bit keys.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;

union FloatBits {
  float f;
  uint32_t u;
};

// Order-preserving map float -> uint32: a > b  <=>  score_key(a) > score_key(b). Adding +0.0 first
// turns -0.0 into +0.0, so the two zeros are one key (they tie, and the lower position wins).
// NaN (either sign) gets key 0, below -inf (key 0x007FFFFF): a NaN score ranks lowest and is kept only
// when k forces it, NaNs among themselves by position -- the rule of every backend (bus_kernels
// topk_gather docstring). Tested on the bits, so it holds under fast-math too.
BUS_HD uint32_t score_key(float s) {
  FloatBits v;
  v.f = s + 0.0f;
  if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return 0u;  // NaN
  // negative floats: flip every bit (larger magnitude -> smaller key); others: set the sign bit
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

// State of the radix select of the k-th largest key of a row.
struct RadixState {
  uint32_t prefix;     // digits fixed so far (the high bits of the k-th largest key)
  uint32_t mask;       // which bits of `prefix` are fixed
  uint32_t remaining;  // rank of the wanted key among the keys that match `prefix` (1-based)
};

BUS_HD RadixState radix_init(int64_t k) {
  RadixState st;
  st.prefix = 0u;
  st.mask = 0u;
  st.remaining = static_cast<uint32_t>(k);
  return st;
}

BUS_HD int radix_shift(int pass) { return 32 - kRadixBits * (pass + 1); }

// Does `key` take part in pass `pass` (its higher digits equal the ones already fixed)?
BUS_HD bool radix_matches(const RadixState& st, uint32_t key) { return (key & st.mask) == st.prefix; }

BUS_HD int radix_digit(uint32_t key, int pass) {
  return static_cast<int>((key >> radix_shift(pass)) & (kRadixBins - 1));
}

// After a pass's histogram of digits: walk the bins from the largest digit down to the bin that holds
// the wanted key, fix that digit and update the rank within the bin.
BUS_HD void radix_pick_bin(RadixState& st, const int* hist, int pass) {
  int d = kRadixBins - 1;
  for (; d > 0; --d) {
    const uint32_t count = static_cast<uint32_t>(hist[d]);
    if (count >= st.remaining) break;
    st.remaining -= count;
  }
  const int shift = radix_shift(pass);
  st.prefix |= static_cast<uint32_t>(d) << shift;
  st.mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
}

// The selection rule once the radix select is done: `threshold` is the k-th largest key and
// `ties_needed` how many keys equal to it are kept (the lowest positions). k == 0 keeps nothing.
struct TopkRule {
  uint32_t threshold;
  uint32_t ties_needed;
};

BUS_HD TopkRule topk_rule(const RadixState& st, int64_t k) {
  TopkRule r;
  if (k <= 0) {
    r.threshold = 0xFFFFFFFFu;  // no key is above it...
    r.ties_needed = 0u;         // ...and no tie is taken
  } else {
    r.threshold = st.prefix;
    r.ties_needed = st.remaining;
  }
  return r;
}

BUS_HD bool is_tie(const TopkRule& r, uint32_t key) { return key == r.threshold && r.ties_needed > 0u; }

// `tie_rank`: how many keys equal to the threshold sit at lower positions of the row.
BUS_HD bool topk_keeps(const TopkRule& r, uint32_t key, uint32_t tie_rank) {
  return key > r.threshold || (key == r.threshold && tie_rank < r.ties_needed);
}

// ---- packed output layout -----------------------------------------------------------------------

// Row b's segments in the packed outputs, from the kept count of the rows before it
// (``kept_before = sum_{b' < b} k[b']``): its kept (then fused) tokens start at this row of `tokens`
// (k + fuse rows per row), its positions at entry ``kept_before`` of `index` (k per row).
BUS_HD int64_t token_segment_start(int64_t kept_before, int64_t b, bool fuse) { return kept_before + (fuse ? b : 0); }

// The channel vectors [lo, hi) of block `cb` when a row's V vectors are split into blocks of `per_block`.
BUS_HD int64_t channel_block_begin(int64_t cb, int64_t per_block, int64_t V) {
  const int64_t lo = cb * per_block;
  return lo < V ? lo : V;
}
BUS_HD int64_t channel_block_end(int64_t cb, int64_t per_block, int64_t V) {
  const int64_t hi = (cb + 1) * per_block;
  return hi < V ? hi : V;
}

// ---- fused token ------------------------------------------------------------------------------

// Weight of token j in the fused token: its score if dropped, 0 if kept.
BUS_HD float fuse_weight(bool kept, float score) { return kept ? 0.0f : score; }

BUS_HD float fuse_denominator(float weight_sum) { return weight_sum > kFuseEps ? weight_sum : kFuseEps; }

// d fused / d s_j = (x_j - fused) / denom while the weight sum is above eps, x_j / eps once clamped;
// this is the factor that multiplies `fused` in that difference.
BUS_HD float fuse_grad_fused_scale(float weight_sum) { return weight_sum > kFuseEps ? 1.0f : 0.0f; }

// One channel's contribution to d loss / d s_j of a dropped token j (before dividing by denom).
BUS_HD float fuse_score_grad_term(float x, float fused, float grad_fused, float fused_scale) {
  return (x - fused_scale * fused) * grad_fused;
}

// ---- text-patch softmax -----------------------------------------------------------------------

// Online log-sum-exp state: the row's running max and sum of exp(z - max).
struct LseState {
  float max;
  float sum;
};

BUS_HD LseState lse_empty() {
  LseState s;
  s.max = -INFINITY;
  s.sum = 0.0f;
  return s;
}

BUS_HD LseState lse_merge(LseState a, LseState b) {
  if (b.sum == 0.0f) return a;  // empty partial (no token seen): nothing to add
  if (a.sum == 0.0f) return b;
  const float m = a.max > b.max ? a.max : b.max;
  LseState r;
  r.max = m;
  r.sum = a.sum * expf(a.max - m) + b.sum * expf(b.max - m);
  return r;
}

// d loss / d (q.k) of one token, for one head: p (g - <p, g>) / H, times the softmax scale.
// Adds one logit z to the state.
BUS_HD LseState lse_push(LseState a, float z) {
  LseState one;
  one.max = z;
  one.sum = 1.0f;
  return lse_merge(a, one);
}

BUS_HD float lse_value(LseState a) { return a.max + logf(a.sum); }

BUS_HD float tps_logit_grad(float p, float g, float pg_dot, float inv_heads_scale) {
  return p * (g - pg_dot) * inv_heads_scale;
}

}  // namespace bus
