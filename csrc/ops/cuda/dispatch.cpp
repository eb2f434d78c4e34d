// CUDA entry points of the bus::* ops: input checks (common/checks.h), output allocation and the
// raw-pointer launchers of the .cu files on the current stream. Built only with CUDA (-DBUS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "launch.h"

namespace bus {
namespace cuda {
namespace {

Dtype kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat32;  // the checks admit only these three
  }
}

// The message is built only when the check fails (err != nullptr); one string, as in checks.h.
void raise_if(const char* err) { TORCH_CHECK(err == nullptr, bus::msg("bus native CUDA kernel: ", err)); }

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gather_op(
    const at::Tensor& x_in, const at::Tensor& scores, const at::Tensor& k_in, int64_t total_kept, bool fuse) {
  check_topk_gather(x_in, scores, k_in, total_kept);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor s32 = scores.to(at::kFloat).contiguous();
  const at::Tensor k = k_in.contiguous();
  auto tokens = at::empty({total_kept + B * (fuse ? 1 : 0), C}, x.options());
  auto index = at::empty({total_kept}, x.options().dtype(at::kLong));
  auto slot = at::empty({B, N}, x.options().dtype(at::kInt));
  // written by the kernel when fuse (the only case the backward reads them): no fills
  auto fused = at::empty({B, C}, x.options().dtype(at::kFloat));
  auto den = at::empty({B}, x.options().dtype(at::kFloat));
  if (B == 0) return {tokens, index, slot, fused, den};
  if (N == 0) {
    // no token, so k == 0 in every row: each row is its fused token alone, zeros (nothing dropped)
    tokens.zero_();
    fused.zero_();
    den.zero_();
    return {tokens, index, slot, fused, den};
  }
  TopkGatherForwardArgs a{};
  a.x = x.data_ptr();
  a.stride_xb = x.stride(0);
  a.stride_xn = x.stride(1);
  a.scores = s32.data_ptr<float>();
  a.k = k.data_ptr<int64_t>();
  a.B = B;
  a.N = N;
  a.C = C;
  a.total_kept = total_kept;
  a.fuse = fuse;
  a.tokens = tokens.data_ptr();
  a.index = index.data_ptr<int64_t>();
  a.slot = slot.data_ptr<int32_t>();
  a.fused = fused.data_ptr<float>();
  a.den = den.data_ptr<float>();
  at::Tensor scratch;
  if (!topk_gather_fits_on_chip(N)) {  // very long rows: keys and slot map in global memory
    scratch = at::empty({B, 2 * N}, x.options().dtype(at::kInt));
    a.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  }
  raise_if(topk_gather_forward(kernel_dtype(x), a, current_stream()));
  return {tokens, index, slot, fused, den};
}

std::tuple<at::Tensor, at::Tensor> topk_gather_backward_op(const at::Tensor& grad_tokens, const at::Tensor& x_in,
                                                        const at::Tensor& scores, const at::Tensor& k_in,
                                                        const at::Tensor& slot, const at::Tensor& fused,
                                                        const at::Tensor& den, bool fuse) {
  check_topk_gather_backward(grad_tokens, x_in, scores, k_in, slot, fused, den);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor g = grad_tokens.to(x.scalar_type()).contiguous();
  const at::Tensor s32 = scores.to(at::kFloat).contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor slot_c = slot.contiguous(), fused_c = fused.contiguous(), den_c = den.contiguous();
  auto grad_x = at::empty({B, N, C}, x.options());
  auto grad_s = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (B > 0 && N > 0) {
    TopkGatherBackwardArgs a{};
    a.grad_tokens = g.data_ptr();
    a.x = x.data_ptr();
    a.stride_xb = x.stride(0);
    a.stride_xn = x.stride(1);
    a.scores = s32.data_ptr<float>();
    a.k = k.data_ptr<int64_t>();
    a.slot = slot_c.data_ptr<int32_t>();
    a.fused = fused_c.data_ptr<float>();
    a.den = den_c.data_ptr<float>();
    a.B = B;
    a.N = N;
    a.C = C;
    a.total_rows = g.size(0);
    a.fuse = fuse;
    a.grad_x = grad_x.data_ptr();
    a.grad_scores = grad_s.data_ptr<float>();
    raise_if(topk_gather_backward(kernel_dtype(x), a, current_stream()));
  }
  return {grad_x, grad_s.to(scores.scalar_type())};
}

TextPatchScoresArgs tps_args(const at::Tensor& q, const at::Tensor& k, double scale) {
  TextPatchScoresArgs a{};
  a.query = q.data_ptr();
  a.stride_qb = q.stride(0);
  a.stride_qh = q.stride(1);
  a.keys = k.data_ptr();
  a.stride_kb = k.stride(0);
  a.stride_kn = k.stride(1);
  a.stride_kh = k.stride(2);
  a.B = k.size(0);
  a.N = k.size(1);
  a.H = k.size(2);
  a.D = k.size(3);
  a.scale = static_cast<float>(scale);
  return a;
}

// Head dims above kMaxHeadDim (the query of a head no longer fits a warp's registers): the same
// computation with ATen ops, fp32 throughout; outputs and saved tensors as the kernels produce them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> text_patch_scores_aten(const at::Tensor& q, const at::Tensor& k,
                                                                      double scale) {
  const at::Tensor logits = at::einsum("bhd,bnhd->bhn", {q.to(at::kFloat) * scale, k.to(at::kFloat)}).contiguous();
  const at::Tensor lse = at::logsumexp(logits, {-1});
  const at::Tensor scores = (logits - lse.unsqueeze(-1)).exp().mean(1);
  return {scores, logits, lse};
}

std::tuple<at::Tensor, at::Tensor> text_patch_scores_backward_aten(const at::Tensor& grad, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& logits,
                                                                   const at::Tensor& lse, double scale) {
  const at::Tensor g = grad.to(at::kFloat).unsqueeze(1);        // (B, 1, N)
  const at::Tensor p = (logits - lse.unsqueeze(-1)).exp();      // (B, H, N)
  const at::Tensor pg = (p * g).sum({-1}, /*keepdim=*/true);    // (B, H, 1)
  const at::Tensor dz = p * (g - pg) * (scale / static_cast<double>(k.size(2)));
  const at::Tensor dq = at::einsum("bhn,bnhd->bhd", {dz, k.to(at::kFloat)});
  const at::Tensor dk = at::einsum("bhn,bhd->bnhd", {dz, q.to(at::kFloat)});
  return {dq.to(q.scalar_type()).contiguous(), dk.to(k.scalar_type()).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> text_patch_scores_op(const at::Tensor& query_in, const at::Tensor& keys_in,
                                                                 double scale) {
  check_text_patch_scores(query_in, keys_in);
  if (query_in.size(2) > kMaxHeadDim) return text_patch_scores_aten(query_in, keys_in, scale);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor q = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  const at::Tensor k = keys_in.stride(3) == 1 ? keys_in : keys_in.contiguous();
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2);
  const auto f32 = k.options().dtype(at::kFloat);
  auto out = at::empty({B, N}, f32);
  auto logits = at::empty({B, H, N}, f32);
  auto lse = at::empty({B, H}, f32);
  TextPatchScoresArgs a = tps_args(q, k, scale);
  a.scores = out.data_ptr<float>();
  a.logits = logits.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  raise_if(text_patch_scores_forward(kernel_dtype(k), a, current_stream()));
  return {out, logits, lse};
}

std::tuple<at::Tensor, at::Tensor> text_patch_scores_backward_op(const at::Tensor& grad, const at::Tensor& query_in,
                                                              const at::Tensor& keys_in, const at::Tensor& logits,
                                                              const at::Tensor& lse, double scale) {
  check_text_patch_scores_backward(grad, query_in, keys_in, logits, lse);
  if (query_in.size(2) > kMaxHeadDim) return text_patch_scores_backward_aten(grad, query_in, keys_in, logits, lse, scale);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor q = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  const at::Tensor k = keys_in.stride(3) == 1 ? keys_in : keys_in.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  const at::Tensor z = logits.contiguous(), l = lse.contiguous();
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  TextPatchScoresArgs a = tps_args(q, k, scale);
  a.logits = const_cast<float*>(z.data_ptr<float>());
  a.lse = const_cast<float*>(l.data_ptr<float>());
  a.grad = g.data_ptr<float>();
  a.grad_query = dq.data_ptr();
  a.grad_keys = dk.data_ptr();
  raise_if(text_patch_scores_backward(kernel_dtype(k), a, current_stream()));
  return {dq, dk};
}

}  // namespace

}  // namespace cuda
}  // namespace bus

TORCH_LIBRARY_IMPL(bus, CUDA, m) {
  m.impl("text_patch_scores", &bus::cuda::text_patch_scores_op);
  m.impl("text_patch_scores_backward", &bus::cuda::text_patch_scores_backward_op);
  m.impl("topk_gather", &bus::cuda::topk_gather_op);
  m.impl("topk_gather_backward", &bus::cuda::topk_gather_backward_op);
}
