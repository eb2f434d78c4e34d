// CPU kernels of bus::text_patch_scores and its backward (BUS TSPS, Sec. 3.2):
// scores[b, n] = mean_h softmax_n(scale * <query[b, h], keys[b, n, h]>), rows in parallel.
// Each row streams its keys once, in memory order (n, then h), with fp32 accumulation; the logits
// (B, H, N) and log-sum-exp (B, H) are kept for the backward, as in the Triton and CUDA paths.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "../common/pruning.h"
#include "loops.h"

namespace bus {
namespace cpu {
namespace {

template <typename T>
void forward_rows(const at::Tensor& q, const at::Tensor& k, float scale, at::Tensor& out, at::Tensor& logits,
                  at::Tensor& lse) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), D = k.size(3);
  const int64_t sqb = q.stride(0), sqh = q.stride(1);
  const int64_t skb = k.stride(0), skn = k.stride(1), skh = k.stride(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  float* op = out.data_ptr<float>();
  float* zp = logits.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float inv_h = 1.f / static_cast<float>(H);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qs(H * D);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const T* qrow = qp + b * sqb + h * sqh;
        for (int64_t d = 0; d < D; ++d) qs[h * D + d] = static_cast<float>(qrow[d]) * scale;
      }
      float* z = zp + b * H * N;  // (H, N)
      for (int64_t n = 0; n < N; ++n) {
        const T* krow = kp + b * skb + n * skn;
        for (int64_t h = 0; h < H; ++h) z[h * N + n] = dot_f32(qs.data() + h * D, krow + h * skh, D);
      }
      float* lrow = lp + b * H;
      for (int64_t h = 0; h < H; ++h) {
        const float* zh = z + h * N;
        LseState st;
        st.max = *std::max_element(zh, zh + N);
        st.sum = 0.f;
        for (int64_t n = 0; n < N; ++n) st.sum += std::exp(zh[n] - st.max);
        lrow[h] = lse_value(st);
      }
      float* o = op + b * N;
      std::fill(o, o + N, 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* zh = z + h * N;
        for (int64_t n = 0; n < N; ++n) o[n] += std::exp(zh[n] - lrow[h]);
      }
      for (int64_t n = 0; n < N; ++n) o[n] *= inv_h;
    }
  });
}

template <typename T>
void backward_rows(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& logits,
                   const at::Tensor& lse, float scale, at::Tensor& dq, at::Tensor& dk) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), D = k.size(3);
  const int64_t sqb = q.stride(0), sqh = q.stride(1);
  const int64_t skb = k.stride(0), skn = k.stride(1), skh = k.stride(2);
  const float* gp = g.data_ptr<float>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const float* zp = logits.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  const float inv_h_scale = scale / static_cast<float>(H);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qf(H * D), dqf(H * D), pg(H), p(H * N);
    for (int64_t b = b0; b < b1; ++b) {
      const float* grow = gp + b * N;
      const float* z = zp + b * H * N;
      for (int64_t h = 0; h < H; ++h) {
        const T* qrow = qp + b * sqb + h * sqh;
        for (int64_t d = 0; d < D; ++d) qf[h * D + d] = static_cast<float>(qrow[d]);
        // p = softmax row of head h; <p, g> over the tokens
        const float l = lp[b * H + h];
        float* ph = p.data() + h * N;
        for (int64_t n = 0; n < N; ++n) ph[n] = std::exp(z[h * N + n] - l);
        pg[h] = dot_f32(ph, grow, N);
      }
      std::fill(dqf.begin(), dqf.end(), 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const T* krow = kp + b * skb + n * skn;
        T* dkrow = dkp + (b * N + n) * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const float dz = tps_logit_grad(p[h * N + n], grow[n], pg[h], inv_h_scale);
          scale_store(dkrow + h * D, dz, qf.data() + h * D, D);
          axpy_f32(dqf.data() + h * D, dz, krow + h * skh, D);
        }
      }
      T* dqrow = dqp + b * H * D;
      for (int64_t i = 0; i < H * D; ++i) dqrow[i] = static_cast<T>(dqf[i]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> text_patch_scores(const at::Tensor& query_in, const at::Tensor& keys_in,
                                                                 double scale) {
  check_text_patch_scores(query_in, keys_in);
  const TextPatchScoresInputs in = text_patch_scores_inputs(query_in, keys_in);
  TextPatchScoresOutputs o = empty_text_patch_scores_outputs(in.keys);
  if (in.keys.size(0) == 0) return o.tuple();
  BUS_DISPATCH_KERNEL_TYPES(in.keys.scalar_type(), "bus_text_patch_scores_cpu", [&] {
    forward_rows<scalar_t>(in.query, in.keys, static_cast<float>(scale), o.scores, o.logits, o.lse);
  });
  return o.tuple();
}

std::tuple<at::Tensor, at::Tensor> text_patch_scores_backward(const at::Tensor& grad, const at::Tensor& query_in,
                                                              const at::Tensor& keys_in, const at::Tensor& logits,
                                                              const at::Tensor& lse, double scale) {
  check_text_patch_scores_backward(grad, query_in, keys_in, logits, lse);
  const TextPatchScoresInputs in = text_patch_scores_inputs(query_in, keys_in);
  const at::Tensor &q = in.query, &k = in.keys;
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (k.size(0) == 0) return {dq, dk};
  const at::Tensor z = logits.contiguous(), l = lse.contiguous();
  BUS_DISPATCH_KERNEL_TYPES(k.scalar_type(), "bus_text_patch_scores_backward_cpu", [&] {
    backward_rows<scalar_t>(g, q, k, z, l, static_cast<float>(scale), dq, dk);
  });
  return {dq, dk};
}

}  // namespace cpu
}  // namespace bus
