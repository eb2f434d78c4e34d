// CUDA entry points of the bus::* ops: input checks (common/checks.h), output allocation and the
// raw-pointer launchers of the .cu files on the current stream. Built only with CUDA (-DBUS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "../common/outputs.h"
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

// The inputs both topk_gather launchers read, named alike in TopkGatherForwardArgs and
// TopkGatherBackwardArgs: x (B, N, C) with unit stride in C, scores (B, N) float32, k (B,).
template <typename Args>
void set_topk_gather_inputs(Args& a, const TopkGatherInputs& in) {
  a.x = in.x.data_ptr();
  a.stride_xb = in.x.stride(0);
  a.stride_xn = in.x.stride(1);
  a.scores = in.scores.data_ptr<float>();
  a.k = in.k.data_ptr<int64_t>();
  a.B = in.x.size(0);
  a.N = in.x.size(1);
  a.C = in.x.size(2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gather_op(
    const at::Tensor& x_in, const at::Tensor& scores, const at::Tensor& k_in, int64_t total_kept, bool fuse) {
  check_topk_gather(x_in, scores, k_in, total_kept);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1);
  const TopkGatherInputs in = topk_gather_inputs(x_in, scores, k_in);
  const TopkGatherOutputs o = empty_topk_gather_outputs(in.x, total_kept, fuse);
  if (topk_gather_needs_no_kernel(o)) return o.tuple();
  TopkGatherForwardArgs a{};
  set_topk_gather_inputs(a, in);
  a.total_kept = total_kept;
  a.fuse = fuse;
  a.tokens = o.tokens.data_ptr();
  a.index = o.index.data_ptr<int64_t>();
  a.slot = o.slot.data_ptr<int32_t>();
  a.fused = o.fused.data_ptr<float>();
  a.den = o.den.data_ptr<float>();
  at::Tensor scratch;
  if (!topk_gather_fits_on_chip(N)) {  // very long rows: keys and slot map in global memory
    scratch = at::empty({B, 2 * N}, in.x.options().dtype(at::kInt));
    a.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  }
  raise_if(topk_gather_forward(kernel_dtype(in.x), a, current_stream()));
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor> topk_gather_backward_op(const at::Tensor& grad_tokens, const at::Tensor& x_in,
                                                        const at::Tensor& scores, const at::Tensor& k_in,
                                                        const at::Tensor& slot, const at::Tensor& fused,
                                                        const at::Tensor& den, bool fuse) {
  check_topk_gather_backward(grad_tokens, x_in, scores, k_in, slot, fused, den);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  const TopkGatherInputs in = topk_gather_inputs(x_in, scores, k_in);
  const at::Tensor& x = in.x;
  const at::Tensor g = grad_tokens.to(x.scalar_type()).contiguous();
  const at::Tensor slot_c = slot.contiguous(), fused_c = fused.contiguous(), den_c = den.contiguous();
  auto grad_x = at::empty({B, N, C}, x.options());
  auto grad_s = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (B > 0 && N > 0) {
    TopkGatherBackwardArgs a{};
    set_topk_gather_inputs(a, in);
    a.grad_tokens = g.data_ptr();
    a.slot = slot_c.data_ptr<int32_t>();
    a.fused = fused_c.data_ptr<float>();
    a.den = den_c.data_ptr<float>();
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
  const TextPatchScoresInputs in = text_patch_scores_inputs(query_in, keys_in);
  const TextPatchScoresOutputs o = empty_text_patch_scores_outputs(in.keys);
  TextPatchScoresArgs a = tps_args(in.query, in.keys, scale);
  a.scores = o.scores.data_ptr<float>();
  a.logits = o.logits.data_ptr<float>();
  a.lse = o.lse.data_ptr<float>();
  raise_if(text_patch_scores_forward(kernel_dtype(in.keys), a, current_stream()));
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor> text_patch_scores_backward_op(const at::Tensor& grad, const at::Tensor& query_in,
                                                              const at::Tensor& keys_in, const at::Tensor& logits,
                                                              const at::Tensor& lse, double scale) {
  check_text_patch_scores_backward(grad, query_in, keys_in, logits, lse);
  if (query_in.size(2) > kMaxHeadDim) return text_patch_scores_backward_aten(grad, query_in, keys_in, logits, lse, scale);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const TextPatchScoresInputs in = text_patch_scores_inputs(query_in, keys_in);
  const at::Tensor &q = in.query, &k = in.keys;
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
