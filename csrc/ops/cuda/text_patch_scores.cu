// CUDA kernels of bus::text_patch_scores and its backward (BUS TSPS, Sec. 3.2):
// scores[b, n] = mean_h softmax_n(scale * <query[b, h], keys[b, n, h]>).
//
//   * logits kernel, one block per (row, head): groups of L lanes (L = D / VEC rounded up to a power
//     of two, at most 32) each take one token, read its key with 16-byte loads, and reduce the dot
//     product with shuffles. The query of the head stays in registers. The logits (B, H, N) are stored
//     (1/D of the key traffic) and the block merges per-lane online log-sum-exp states.
//   * combine kernel, (row, token block): mean over heads of exp(logit - lse).
//   * backward kernel, one block per (row, head): <p, g> by a block reduction, then one pass over the
//     keys that writes grad_keys once (no atomics) and accumulates grad_query in registers, reduced
//     across token groups in shared memory.
#include "device_utils.cuh"
#include "launch.h"
#include "../common/pruning.h"

namespace bus {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kCombineThreads = 256;

// Chunks of VEC elements a lane handles at most: D <= kMaxHeadDim with up to 32 lanes per token.
template <int VEC>
struct ChunksPerLane {
  static constexpr int value = static_cast<int>((kMaxHeadDim + 32 * VEC - 1) / (32 * VEC));
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) tps_logits_kernel(TextPatchScoresArgs a, int lanes_log2) {
  constexpr int CPL = ChunksPerLane<VEC>::value;
  const int L = 1 << lanes_log2;
  const int tid = threadIdx.x;
  const int sub = tid & (L - 1), group = tid >> lanes_log2, groups = kThreads >> lanes_log2;
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int64_t N = a.N, H = a.H, chunks = a.D / VEC;

  const T* q = static_cast<const T*>(a.query) + b * a.stride_qb + h * a.stride_qh;
  float qr[CPL][VEC];
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    const int64_t c = sub + i * L;
    if (c < chunks) {
      const Pack<T, VEC> p = load_pack<T, VEC>(q + c * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) qr[i][j] = to_f32(p.v[j]) * a.scale;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) qr[i][j] = 0.f;
    }
  }

  const T* kb = static_cast<const T*>(a.keys) + b * a.stride_kb + h * a.stride_kh;
  float* z_row = a.logits + (b * H + h) * N;
  LseState st = lse_empty();
  for (int64_t n0 = 0; n0 < N; n0 += groups) {  // uniform trip count: every lane reaches the shuffles
    const int64_t n = n0 + group;
    const bool valid = n < N;
    float part = 0.f;
    if (valid) {
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int64_t c = sub + i * L;
        if (c < chunks) {
          const Pack<T, VEC> p = load_pack<T, VEC>(kb + n * a.stride_kn + c * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) part += qr[i][j] * to_f32(p.v[j]);
        }
      }
    }
    for (int o = L >> 1; o > 0; o >>= 1) part += __shfl_xor_sync(kFullMask, part, o);
    if (valid && sub == 0) {
      z_row[n] = part;
      st = lse_push(st, part);
    }
  }
  // merge the lanes' (max, sum) states: warp shuffles, then across warps
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    LseState other;
    other.max = __shfl_xor_sync(kFullMask, st.max, o);
    other.sum = __shfl_xor_sync(kFullMask, st.sum, o);
    st = lse_merge(st, other);
  }
  __shared__ float warp_max[kThreads / 32], warp_sum_buf[kThreads / 32];
  if ((tid & 31) == 0) {
    warp_max[tid >> 5] = st.max;
    warp_sum_buf[tid >> 5] = st.sum;
  }
  __syncthreads();
  if (tid == 0) {
    LseState all = lse_empty();
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      LseState part;
      part.max = warp_max[w];
      part.sum = warp_sum_buf[w];
      all = lse_merge(all, part);
    }
    a.lse[b * H + h] = lse_value(all);
  }
}

__global__ void __launch_bounds__(kCombineThreads) tps_combine_kernel(TextPatchScoresArgs a) {
  const int64_t b = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x;
  if (n >= a.N) return;
  float acc = 0.f;
  for (int64_t h = 0; h < a.H; ++h) acc += expf(a.logits[(b * a.H + h) * a.N + n] - a.lse[b * a.H + h]);
  a.scores[b * a.N + n] = acc / static_cast<float>(a.H);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) tps_bwd_kernel(TextPatchScoresArgs a, int lanes_log2) {
  constexpr int CPL = ChunksPerLane<VEC>::value;
  const int L = 1 << lanes_log2;
  const int tid = threadIdx.x;
  const int sub = tid & (L - 1), group = tid >> lanes_log2, groups = kThreads >> lanes_log2;
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int64_t N = a.N, H = a.H, D = a.D, chunks = a.D / VEC;
  const float* z_row = a.logits + (b * H + h) * N;
  const float* g_row = a.grad + b * N;
  const float lse = a.lse[b * H + h];
  __shared__ float sum_buf[kThreads / 32];
  // Every group covers at most 128 * VEC (L >= chunks) or 4 * D (L = 32) floats of grad_query.
  __shared__ float red[1024];

  float pg = 0.f;
  for (int64_t n = tid; n < N; n += kThreads) pg += expf(z_row[n] - lse) * g_row[n];
  pg = block_sum<kThreads>(pg, sum_buf);

  const T* q = static_cast<const T*>(a.query) + b * a.stride_qb + h * a.stride_qh;
  float qr[CPL][VEC], dq[CPL][VEC];
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    const int64_t c = sub + i * L;
    Pack<T, VEC> p;
    if (c < chunks) p = load_pack<T, VEC>(q + c * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      qr[i][j] = c < chunks ? to_f32(p.v[j]) : 0.f;
      dq[i][j] = 0.f;
    }
  }
  const float inv_h_scale = a.scale / static_cast<float>(H);
  const T* kb = static_cast<const T*>(a.keys) + b * a.stride_kb + h * a.stride_kh;
  T* dk = static_cast<T*>(a.grad_keys) + (b * N * H + h) * D;
  for (int64_t n = group; n < N; n += groups) {
    const float dz = tps_logit_grad(expf(z_row[n] - lse), g_row[n], pg, inv_h_scale);
#pragma unroll
    for (int i = 0; i < CPL; ++i) {
      const int64_t c = sub + i * L;
      if (c < chunks) {
        const Pack<T, VEC> kp = load_pack<T, VEC>(kb + n * a.stride_kn + c * VEC);
        Pack<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dq[i][j] += dz * to_f32(kp.v[j]);
          out.v[j] = from_f32<T>(dz * qr[i][j]);
        }
        store_pack<T, VEC>(dk + n * H * D + c * VEC, out);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    const int64_t c = sub + i * L;
    if (c < chunks) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[group * D + c * VEC + j] = dq[i][j];
    }
  }
  __syncthreads();
  T* dq_out = static_cast<T*>(a.grad_query) + (b * H + h) * D;
  for (int64_t d = tid; d < D; d += kThreads) {
    float acc = 0.f;
    for (int g = 0; g < groups; ++g) acc += red[g * D + d];
    dq_out[d] = from_f32<T>(acc);
  }
}

const char* check_launch() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// log2 of the lanes per token: D / VEC chunks rounded up to a power of two, at most 32.
int lanes_log2_for(int64_t chunks) {
  int log2 = 0;
  while ((int64_t{1} << log2) < chunks && log2 < 5) ++log2;
  return log2;
}

template <typename T>
bool can_vectorize(const TextPatchScoresArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  return a.D % VEC == 0 && a.stride_qb % VEC == 0 && a.stride_qh % VEC == 0 && a.stride_kb % VEC == 0 &&
         a.stride_kn % VEC == 0 && a.stride_kh % VEC == 0 && aligned16(a.query) && aligned16(a.keys);
}

template <typename T, int VEC>
const char* launch_typed(const TextPatchScoresArgs& a, bool backward, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(a.H));
  const int lanes_log2 = lanes_log2_for(a.D / VEC);
  if (backward) {
    tps_bwd_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(a, lanes_log2);
    return check_launch();
  }
  tps_logits_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(a, lanes_log2);
  const char* err = check_launch();
  if (err != nullptr) return err;
  const dim3 grid2(static_cast<unsigned>(a.B), static_cast<unsigned>((a.N + kCombineThreads - 1) / kCombineThreads));
  tps_combine_kernel<<<grid2, kCombineThreads, 0, stream>>>(a);
  return check_launch();
}

template <typename T>
const char* dispatch_vec(const TextPatchScoresArgs& a, bool backward, cudaStream_t stream) {
  const bool vec = can_vectorize<T>(a) && (!backward || aligned16(a.grad_keys));
  if (vec) return launch_typed<T, 16 / sizeof(T)>(a, backward, stream);
  return launch_typed<T, 1>(a, backward, stream);
}

const char* run(Dtype dtype, const TextPatchScoresArgs& a, bool backward, void* stream) {
  if (a.B == 0 || a.N == 0) return nullptr;
  if (a.D > kMaxHeadDim) return "text_patch_scores: head dim D > 256 is not supported by the native CUDA kernels";
  if (a.B > 2147483647LL || a.H > 65535) return "text_patch_scores: batch size or head count exceeds the CUDA grid";
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::kFloat32: return dispatch_vec<float>(a, backward, s);
    case Dtype::kFloat16: return dispatch_vec<__half>(a, backward, s);
    case Dtype::kBFloat16: return dispatch_vec<__nv_bfloat16>(a, backward, s);
  }
  return "text_patch_scores: unsupported dtype";
}

}  // namespace

const char* text_patch_scores_forward(Dtype dtype, const TextPatchScoresArgs& a, void* stream) {
  return run(dtype, a, false, stream);
}

const char* text_patch_scores_backward(Dtype dtype, const TextPatchScoresArgs& a, void* stream) {
  return run(dtype, a, true, stream);
}

}  // namespace cuda
}  // namespace bus
