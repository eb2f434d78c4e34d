// What the CPU and CUDA entry points of the bus::* ops prepare alike (cpu/*.cpp, cuda/dispatch.cpp):
// the layouts their kernels read and each op's output tensors, allocated uninitialised (the kernels
// write every element that is read later), with the cases that need no kernel.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace bus {

// x with unit stride in its last dim, scores as float32, k contiguous: what the topk_gather kernels read.
struct TopkGatherInputs {
  at::Tensor x, scores, k;
};

inline TopkGatherInputs topk_gather_inputs(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& k) {
  return {x.stride(2) == 1 ? x : x.contiguous(), scores.to(at::kFloat).contiguous(), k.contiguous()};
}

// topk_gather's outputs for x (B, N, C): tokens (total_kept + B * fuse, C) in x's dtype, index
// (total_kept,) int64, slot (B, N) int32, fused (B, C) and den (B,) float32. fused and den are written
// by the kernels when fuse, the only case the backward reads them: no fills.
struct TopkGatherOutputs {
  at::Tensor tokens, index, slot, fused, den;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {tokens, index, slot, fused, den};
  }
};

inline TopkGatherOutputs empty_topk_gather_outputs(const at::Tensor& x, int64_t total_kept, bool fuse) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  return {at::empty({total_kept + B * (fuse ? 1 : 0), C}, x.options()),
          at::empty({total_kept}, x.options().dtype(at::kLong)), at::empty({B, N}, x.options().dtype(at::kInt)),
          at::empty({B, C}, x.options().dtype(at::kFloat)), at::empty({B}, x.options().dtype(at::kFloat))};
}

// True when `out` (for x (B, N, C)) is complete without a kernel: no rows, or no tokens (N == 0, so
// k == 0 in every row: each row is its fused token alone, zeros, nothing dropped).
inline bool topk_gather_needs_no_kernel(const TopkGatherOutputs& out) {
  if (out.slot.size(0) == 0) return true;
  if (out.slot.size(1) != 0) return false;
  out.tokens.zero_();
  out.fused.zero_();
  out.den.zero_();
  return true;
}

// query (B, H, D) and keys (B, N, H, D) with unit stride in D: what the text_patch_scores kernels read.
struct TextPatchScoresInputs {
  at::Tensor query, keys;
};

inline TextPatchScoresInputs text_patch_scores_inputs(const at::Tensor& query, const at::Tensor& keys) {
  return {query.stride(2) == 1 ? query : query.contiguous(), keys.stride(3) == 1 ? keys : keys.contiguous()};
}

// text_patch_scores' outputs for keys (B, N, H, D), float32: scores (B, N), and for the backward the
// logits (B, H, N) and their log-sum-exp over N (B, H).
struct TextPatchScoresOutputs {
  at::Tensor scores, logits, lse;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {scores, logits, lse}; }
};

inline TextPatchScoresOutputs empty_text_patch_scores_outputs(const at::Tensor& keys) {
  const int64_t B = keys.size(0), N = keys.size(1), H = keys.size(2);
  const auto f32 = keys.options().dtype(at::kFloat);
  return {at::empty({B, N}, f32), at::empty({B, H, N}, f32), at::empty({B, H}, f32)};
}

}  // namespace bus
