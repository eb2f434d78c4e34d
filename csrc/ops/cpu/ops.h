// CPU entry points of the bus::* ops (registered in csrc/ops/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include <tuple>

// The dtypes the kernels are instantiated for (fp32 accumulation inside).
#define BUS_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace bus {
namespace cpu {

// query (B, H, D), keys (B, N, H, D) -> scores (B, N) f32, logits (B, H, N) f32, lse (B, H) f32
std::tuple<at::Tensor, at::Tensor, at::Tensor> text_patch_scores(const at::Tensor& query, const at::Tensor& keys,
                                                                 double scale);

// grad (B, N) -> grad_query (B, H, D), grad_keys (B, N, H, D), in the inputs' dtype
std::tuple<at::Tensor, at::Tensor> text_patch_scores_backward(const at::Tensor& grad, const at::Tensor& query,
                                                              const at::Tensor& keys, const at::Tensor& logits,
                                                              const at::Tensor& lse, double scale);

// x (B, N, C), scores (B, N), k (B,) int64 -> tokens (total_kept + B*fuse, C), index (total_kept,) int64,
// slot (B, N) int32 (output row within the row's segment, -1 = dropped), fused (B, C) f32, den (B,) f32
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gather(const at::Tensor& x,
                                                                                   const at::Tensor& scores,
                                                                                   const at::Tensor& k,
                                                                                   int64_t total_kept, bool fuse);

// grad_tokens (total, C) -> grad_x (B, N, C) in x's dtype, grad_scores (B, N) in scores' dtype
std::tuple<at::Tensor, at::Tensor> topk_gather_backward(const at::Tensor& grad_tokens, const at::Tensor& x,
                                                        const at::Tensor& scores, const at::Tensor& k,
                                                        const at::Tensor& slot, const at::Tensor& fused,
                                                        const at::Tensor& den, bool fuse);

}  // namespace cpu
}  // namespace bus
