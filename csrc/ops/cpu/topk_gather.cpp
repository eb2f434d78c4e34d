// CPU kernels of bus::topk_gather and its backward (BUS TSPS, Sec. 3.2): the CUDA algorithm in two
// parallel passes (at::parallel_for). Per row: keys + radix select of the k-th largest score
// (common/pruning.h) and one ascending pass that assigns the slots and sums the fuse weights; then per
// (row, channel block), as the CUDA kernel splits it: the kept tokens copied, the fused token
// accumulated in fp32.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "../common/pruning.h"
#include "loops.h"

namespace bus {
namespace cpu {
namespace {

// Start of each row in the packed tokens (k + fuse rows each) and in the packed index (k each).
struct RowOffsets {
  std::vector<int64_t> out, index;
};

RowOffsets row_offsets(const int64_t* k, int64_t B, bool fuse) {
  RowOffsets o;
  o.out.resize(B);
  o.index.resize(B);
  int64_t kept_before = 0;
  for (int64_t b = 0; b < B; ++b) {
    o.out[b] = token_segment_start(kept_before, b, fuse);
    o.index[b] = kept_before;
    kept_before += k[b];
  }
  return o;
}

// The k-th largest key and the tie rule of one row.
TopkRule select_row(const uint32_t* keys, int64_t N, int64_t k) {
  RadixState st = radix_init(k);
  if (k > 0) {
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      int hist[kRadixBins] = {0};
      for (int64_t n = 0; n < N; ++n) {
        if (radix_matches(st, keys[n])) ++hist[radix_digit(keys[n], pass)];
      }
      radix_pick_bin(st, hist, pass);
    }
  }
  return topk_rule(st, k);
}

// Channels of a row one gather task copies / accumulates when rows are split (the CUDA kernels' channel
// blocks, in elements).
constexpr int64_t kChannelBlock = 256;

template <typename T>
void forward_rows(const at::Tensor& x, const at::Tensor& s32, const int64_t* k, const RowOffsets& off, bool fuse,
                  at::Tensor& tokens, at::Tensor& index, at::Tensor& slot, at::Tensor& fused, at::Tensor& den) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t sxb = x.stride(0), sxn = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const float* sp = s32.data_ptr<float>();
  T* tp = tokens.data_ptr<T>();
  int64_t* ip = index.data_ptr<int64_t>();
  int32_t* slp = slot.data_ptr<int32_t>();
  float* fp = fused.data_ptr<float>();
  float* dp = den.data_ptr<float>();
  // 1. per row: keys, radix select, slots (ascending), index and the fuse weight sum
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> keys(N);
    for (int64_t b = b0; b < b1; ++b) {
      const float* s = sp + b * N;
      int64_t* idx = ip + off.index[b];
      int32_t* sl = slp + b * N;
      for (int64_t n = 0; n < N; ++n) keys[n] = score_key(s[n]);
      const TopkRule rule = select_row(keys.data(), N, k[b]);
      uint32_t tie_rank = 0;
      int32_t kept = 0;
      float weight_sum = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const bool keep = topk_keeps(rule, keys[n], tie_rank);
        tie_rank += keys[n] == rule.threshold ? 1u : 0u;
        sl[n] = keep ? kept : -1;
        if (keep) idx[kept++] = n;
        weight_sum += fuse ? fuse_weight(keep, s[n]) : 0.f;
      }
      if (fuse) dp[b] = weight_sum;
    }
  });
  // 2. per (row, channel block), as the CUDA kernel splits the gather: kept tokens copied to their slot,
  // dropped ones accumulated in fp32 into the fused token (ascending positions: the same sums whatever the
  // split). Rows are split into channel blocks only when there are fewer rows than threads: with enough rows
  // one pass per row reads x most cheaply.
  const int64_t per_block = B >= at::get_num_threads() ? (C > 0 ? C : 1) : kChannelBlock;
  const int64_t blocks = C > per_block ? (C + per_block - 1) / per_block : 1;
  at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(per_block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks;
      const int64_t lo = channel_block_begin(t % blocks, per_block, C);
      const int64_t width = channel_block_end(t % blocks, per_block, C) - lo;
      const float* s = sp + b * N;
      const int32_t* sl = slp + b * N;
      const T* xb = xp + b * sxb + lo;
      T* out = tp + off.out[b] * C + lo;
      std::fill(acc.begin(), acc.begin() + width, 0.f);
      for (int64_t n = 0; n < N; ++n) {
        if (sl[n] >= 0) {
          std::memcpy(out + sl[n] * C, xb + n * sxn, width * sizeof(T));
        } else if (fuse) {
          axpy_f32(acc.data(), fuse_weight(false, s[n]), xb + n * sxn, width);
        }
      }
      if (fuse) {
        const float inv = 1.f / fuse_denominator(dp[b]);
        float* f = fp + b * C + lo;
        T* fused_out = out + k[b] * C;
        for (int64_t c = 0; c < width; ++c) {
          f[c] = acc[c] * inv;
          fused_out[c] = static_cast<T>(f[c]);
        }
      }
    }
  });
}

template <typename T>
void backward_rows(const at::Tensor& g, const at::Tensor& x, const at::Tensor& s32, const int64_t* k,
                   const RowOffsets& off, const at::Tensor& slot, const at::Tensor& fused, const at::Tensor& den,
                   bool fuse, at::Tensor& grad_x, at::Tensor& grad_s) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t sxb = x.stride(0), sxn = x.stride(1);
  const T* gp = g.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* sp = s32.data_ptr<float>();
  const int32_t* slp = slot.data_ptr<int32_t>();
  const float* fp = fused.data_ptr<float>();
  const float* dp = den.data_ptr<float>();
  T* gxp = grad_x.data_ptr<T>();
  float* gsp = grad_s.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> gf(C), diff(C);
    for (int64_t b = b0; b < b1; ++b) {
      const T* grow = gp + off.out[b] * C;
      const int32_t* sl = slp + b * N;
      const float* f = fp + b * C;
      const float denom = fuse ? fuse_denominator(dp[b]) : 1.f;
      const float fused_scale = fuse ? fuse_grad_fused_scale(dp[b]) : 0.f;
      if (fuse) to_f32(gf.data(), grow + k[b] * C, C);
      for (int64_t n = 0; n < N; ++n) {
        T* gx = gxp + (b * N + n) * C;
        float gs = 0.f;
        if (sl[n] >= 0) {
          std::memcpy(gx, grow + sl[n] * C, C * sizeof(T));
        } else if (fuse) {
          scale_store(gx, sp[b * N + n] / denom, gf.data(), C);
          const T* xr = xp + b * sxb + n * sxn;
          for (int64_t c = 0; c < C; ++c) diff[c] = static_cast<float>(xr[c]) - fused_scale * f[c];
          gs = dot_f32(diff.data(), gf.data(), C) / denom;
        } else {
          std::memset(gx, 0, C * sizeof(T));
        }
        gsp[b * N + n] = gs;
      }
    }
  });
}

void check_k_values(const int64_t* k, int64_t B, int64_t N, int64_t total_kept) {
  int64_t sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(k[b] >= 0 && k[b] <= N,
                      bus::msg("k must be in [0, N=", N, "] for every row, got ", k[b], " in row ", b));
    sum += k[b];
  }
  TORCH_CHECK_VALUE(sum == total_kept, bus::msg("total_kept must equal sum(k)=", sum, ", got ", total_kept));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gather(
    const at::Tensor& x_in, const at::Tensor& scores, const at::Tensor& k_in, int64_t total_kept, bool fuse) {
  check_topk_gather(x_in, scores, k_in, total_kept);
  const int64_t B = x_in.size(0), N = x_in.size(1);
  const TopkGatherInputs in = topk_gather_inputs(x_in, scores, k_in);
  check_k_values(in.k.data_ptr<int64_t>(), B, N, total_kept);
  TopkGatherOutputs o = empty_topk_gather_outputs(in.x, total_kept, fuse);
  if (topk_gather_needs_no_kernel(o)) return o.tuple();
  const RowOffsets off = row_offsets(in.k.data_ptr<int64_t>(), B, fuse);
  BUS_DISPATCH_KERNEL_TYPES(in.x.scalar_type(), "bus_topk_gather_cpu", [&] {
    forward_rows<scalar_t>(in.x, in.scores, in.k.data_ptr<int64_t>(), off, fuse, o.tokens, o.index, o.slot, o.fused,
                           o.den);
  });
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor> topk_gather_backward(const at::Tensor& grad_tokens, const at::Tensor& x_in,
                                                        const at::Tensor& scores, const at::Tensor& k_in,
                                                        const at::Tensor& slot, const at::Tensor& fused,
                                                        const at::Tensor& den, bool fuse) {
  check_topk_gather_backward(grad_tokens, x_in, scores, k_in, slot, fused, den);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  const TopkGatherInputs in = topk_gather_inputs(x_in, scores, k_in);
  const at::Tensor &x = in.x, &s32 = in.scores, &k = in.k;
  const at::Tensor g = grad_tokens.to(x.scalar_type()).contiguous();
  int64_t total_kept = 0;
  for (int64_t b = 0; b < B; ++b) total_kept += k.data_ptr<int64_t>()[b];
  check_k_values(k.data_ptr<int64_t>(), B, N, total_kept);
  check_dim_size("grad_tokens", g, 0, total_kept + B * (fuse ? 1 : 0), "sum(k) + B * fuse rows");
  auto grad_x = at::empty({B, N, C}, x.options());
  auto grad_s = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (B > 0 && N > 0) {
    const RowOffsets off = row_offsets(k.data_ptr<int64_t>(), B, fuse);
    const at::Tensor slot_c = slot.contiguous(), fused_c = fused.contiguous(), den_c = den.contiguous();
    BUS_DISPATCH_KERNEL_TYPES(x.scalar_type(), "bus_topk_gather_backward_cpu", [&] {
      backward_rows<scalar_t>(g, x, s32, k.data_ptr<int64_t>(), off, slot_c, fused_c, den_c, fuse, grad_x, grad_s);
    });
  }
  return {grad_x, grad_s.to(scores.scalar_type())};
}

}  // namespace cpu
}  // namespace bus
