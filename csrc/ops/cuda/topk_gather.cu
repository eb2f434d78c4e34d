// CUDA kernels of bus::topk_gather and its backward (BUS TSPS, Sec. 3.2).
//
// Forward, one block per (row, channel block), everything on-chip, one launch:
//   0. the row's segment offsets: the kept counts of the rows before it, summed by the block
//      (no cumsum launches);
//   1. the row's scores -> order-preserving uint32 keys in shared memory (common/pruning.h);
//   2. radix select of the k-th largest key: 4 passes of a 256-bin shared-memory histogram;
//   3. tie ranks and output slots by two block-wide prefix sums over contiguous per-thread segments
//      (ties go to the lower position, kept positions come out ascending);
//   4. one pass over the block's channels of x with 16-byte loads: kept rows are stored to their slot,
//      dropped rows are accumulated in fp32 into the fused token (row groups x channel vectors, reduced
//      in shared memory).
// Steps 1-3 are the row's selection, repeated by each of its channel blocks (N scores against N x C
// tokens: a few percent of the block's traffic) so that the gather is spread over (row, channel block)
// -- B x C / (16 vectors) blocks instead of B -- without a second launch or a round trip through global
// memory; the first channel block writes the row's slot map, index and weight sum.
// Backward, a warp per token row, (row, 32-token block) blocks: grad_x is written once per element (a
// copy of the kept row's gradient, or the fused token's gradient times s_j / denom): no atomics;
// grad_scores is a warp reduction over the channels.
#include "device_utils.cuh"
#include "launch.h"
#include "../common/pruning.h"

namespace bus {
namespace cuda {
namespace {

constexpr int kFwdThreads = 256;
// Two resident blocks per SM (<= 128 registers): without a minimum ptxas capped the
// scalar variants at 40 registers and spilled on sm_80.
constexpr int kFwdMinBlocks = 2;
constexpr int kBwdThreads = 256;
constexpr int kBwdRowsPerBlock = 32;
constexpr int kStaticSmemLimit = 48 * 1024;
// Bytes of each row a forward block gathers: 256 (16 vectors of 16 bytes), narrowed down to 64 while
// the grid would leave SMs idle (fewer than kBlocksPerSm blocks per SM).
constexpr int64_t kChannelBytes = 256;
constexpr int64_t kMinChannelBytes = 64;
constexpr int64_t kBlocksPerSm = 2;

template <typename T, int VEC>
__global__ void __launch_bounds__(kFwdThreads, kFwdMinBlocks) topk_gather_fwd_kernel(TopkGatherForwardArgs a,
                                                                                     int64_t vecs_per_block) {
  extern __shared__ uint32_t dyn[];
  // (N,) keys, then the fuse weights (as float), and (N,) slots: on-chip, or for very long rows in global
  // scratch (one channel block per row then: gridDim.y == 1)
  uint32_t* keys = a.scratch != nullptr ? a.scratch + 2 * a.N * static_cast<int64_t>(blockIdx.x) : dyn;
  int32_t* slots = reinterpret_cast<int32_t*>(keys + a.N);
  float* weights = reinterpret_cast<float*>(keys);
  __shared__ int hist[kRadixBins];
  __shared__ int scan_buf[kFwdThreads / 32 + 1];
  __shared__ float sum_buf[kFwdThreads / 32];
  __shared__ long long offset_buf[kFwdThreads / 32];
  __shared__ RadixState radix_shared;
  __shared__ float red[kFwdThreads * VEC];

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const bool row_writer = blockIdx.y == 0;  // writes the row's slot map, index and weight sum
  const int64_t N = a.N, C = a.C;
  const int64_t k = a.k[b];
  const int64_t kept_before = kept_before_row<kFwdThreads>(a.k, b, offset_buf);  // every thread takes part
  const int64_t out_row = token_segment_start(kept_before, b, a.fuse);
  const int64_t index_row = kept_before;
  // inconsistent k (never from bus_kernels): write nothing rather than out of bounds
  if (k < 0 || k > N || out_row + k + (a.fuse ? 1 : 0) > a.total_kept + (a.fuse ? a.B : 0) ||
      index_row + k > a.total_kept) {
    return;
  }
  const float* s = a.scores + b * N;

  // 1. keys
  for (int64_t n = tid; n < N; n += kFwdThreads) keys[n] = score_key(s[n]);
  __syncthreads();

  // 2. radix select of the k-th largest key
  RadixState st = radix_init(k);
  if (k > 0) {
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      for (int i = tid; i < kRadixBins; i += kFwdThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t n = tid; n < N; n += kFwdThreads) {
        const uint32_t key = keys[n];
        if (radix_matches(st, key)) atomicAdd(&hist[radix_digit(key, pass)], 1);
      }
      __syncthreads();
      if (tid == 0) {
        radix_pick_bin(st, hist, pass);
        radix_shared = st;
      }
      __syncthreads();
      st = radix_shared;
    }
  }
  const TopkRule rule = topk_rule(st, k);

  // 3. tie ranks, then slots, over contiguous segments so that positions stay in order
  const int64_t per = (N + kFwdThreads - 1) / kFwdThreads;
  const int64_t lo = min64(N, tid * per), hi = min64(N, lo + per);
  int ties = 0;
  for (int64_t n = lo; n < hi; ++n) ties += keys[n] == rule.threshold ? 1 : 0;
  int total = 0;
  const int tie_base = block_exclusive_scan<kFwdThreads>(ties, scan_buf, total);
  int kept = 0;
  {
    uint32_t tie_rank = static_cast<uint32_t>(tie_base);
    for (int64_t n = lo; n < hi; ++n) {
      kept += topk_keeps(rule, keys[n], tie_rank) ? 1 : 0;
      tie_rank += keys[n] == rule.threshold ? 1u : 0u;
    }
  }
  const int slot_base = block_exclusive_scan<kFwdThreads>(kept, scan_buf, total);
  float weight_sum = 0.f;
  {
    uint32_t tie_rank = static_cast<uint32_t>(tie_base);
    int next = slot_base;
    for (int64_t n = lo; n < hi; ++n) {
      const uint32_t key = keys[n];
      const bool keep = topk_keeps(rule, key, tie_rank);
      tie_rank += key == rule.threshold ? 1u : 0u;
      const int slot = keep ? next++ : -1;
      slots[n] = slot;
      if (row_writer) {
        a.slot[b * N + n] = slot;
        if (keep) a.index[index_row + slot] = n;
      }
      const float w = a.fuse ? fuse_weight(keep, s[n]) : 0.f;
      weights[n] = w;  // the key of n is no longer needed (this thread owns position n)
      weight_sum += w;
    }
  }
  const float den = block_sum<kFwdThreads>(weight_sum, sum_buf);  // also syncs slots / weights
  if (tid == 0 && a.fuse && row_writer) a.den[b] = den;

  // 4. gather + fused accumulation over this block's channel vectors [v_lo, v_hi): TV threads across
  // them, G row groups
  const T* xb = static_cast<const T*>(a.x) + b * a.stride_xb;
  T* out = static_cast<T*>(a.tokens) + out_row * C;
  const int64_t V = C / VEC;
  const int64_t v_lo = channel_block_begin(blockIdx.y, vecs_per_block, V);
  const int64_t v_hi = channel_block_end(blockIdx.y, vecs_per_block, V);
  const int64_t width = vecs_per_block < V ? vecs_per_block : V;  // block-uniform: every thread loops alike
  const int TV = static_cast<int>(width < 1 ? 1 : (width < kFwdThreads ? width : kFwdThreads));
  const int G = kFwdThreads / TV;
  const int g = tid / TV, lane = tid % TV;
  const float inv_den = 1.f / fuse_denominator(den);
  for (int64_t vb = v_lo; vb < v_hi; vb += TV) {
    const int64_t v = vb + lane;
    const bool active = g < G && v < v_hi;
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (active) {
      for (int64_t n = g; n < N; n += G) {
        const Pack<T, VEC> p = load_pack<T, VEC>(xb + n * a.stride_xn + v * VEC);
        const int slot = slots[n];
        if (slot >= 0) {
          store_pack<T, VEC>(out + slot * C + v * VEC, p);
        } else if (a.fuse) {
          const float w = weights[n];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += w * to_f32(p.v[j]);
        }
      }
    }
    if (a.fuse) {
      if (G > 1) {
        if (active) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) red[(g * TV + lane) * VEC + j] = acc[j];
        }
        __syncthreads();
        if (active && g == 0) {
          for (int g2 = 1; g2 < G; ++g2) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += red[(g2 * TV + lane) * VEC + j];
          }
        }
        __syncthreads();
      }
      if (active && g == 0) {
        Pack<T, VEC> f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float value = acc[j] * inv_den;
          a.fused[b * C + v * VEC + j] = value;
          f.v[j] = from_f32<T>(value);
        }
        store_pack<T, VEC>(out + k * C + v * VEC, f);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdThreads) topk_gather_bwd_kernel(TopkGatherBackwardArgs a) {
  __shared__ long long offset_buf[kBwdThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  const int64_t N = a.N, C = a.C, V = C / VEC;
  const int64_t k = a.k[b];
  const int64_t out_row = token_segment_start(kept_before_row<kBwdThreads>(a.k, b, offset_buf), b, a.fuse);
  const bool rows_ok = k >= 0 && k <= N && out_row + k + (a.fuse ? 1 : 0) <= a.total_rows;
  const T* g_seg = static_cast<const T*>(a.grad_tokens) + out_row * C;
  const T* g_fused = g_seg + k * C;
  const float* f = a.fused + b * C;
  const float den = a.fuse ? a.den[b] : 0.f;
  const float denom = fuse_denominator(den);
  const float fused_scale = fuse_grad_fused_scale(den);
  const int64_t n_end = min64(N, static_cast<int64_t>(blockIdx.y + 1) * kBwdRowsPerBlock);
  for (int64_t n = blockIdx.y * kBwdRowsPerBlock + warp; n < n_end; n += kBwdThreads / 32) {
    const int slot = a.slot[b * N + n];
    T* gx = static_cast<T*>(a.grad_x) + (b * N + n) * C;
    float gs = 0.f;
    if (!rows_ok) {
      // inconsistent k / offsets: zero gradient rather than out-of-bounds reads
      for (int64_t v = lane; v < V; v += 32) {
        Pack<T, VEC> z;
#pragma unroll
        for (int j = 0; j < VEC; ++j) z.v[j] = from_f32<T>(0.f);
        store_pack<T, VEC>(gx + v * VEC, z);
      }
    } else if (slot >= 0) {
      for (int64_t v = lane; v < V; v += 32) store_pack<T, VEC>(gx + v * VEC, load_pack<T, VEC>(g_seg + slot * C + v * VEC));
    } else if (a.fuse) {
      const float coef = a.scores[b * N + n] / denom;
      const T* xr = static_cast<const T*>(a.x) + b * a.stride_xb + n * a.stride_xn;
      for (int64_t v = lane; v < V; v += 32) {
        const Pack<T, VEC> gp = load_pack<T, VEC>(g_fused + v * VEC);
        const Pack<T, VEC> xp = load_pack<T, VEC>(xr + v * VEC);
        Pack<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float gf = to_f32(gp.v[j]);
          out.v[j] = from_f32<T>(coef * gf);
          gs += fuse_score_grad_term(to_f32(xp.v[j]), f[v * VEC + j], gf, fused_scale);
        }
        store_pack<T, VEC>(gx + v * VEC, out);
      }
      gs = warp_sum(gs) / denom;
    } else {
      for (int64_t v = lane; v < V; v += 32) {
        Pack<T, VEC> z;
#pragma unroll
        for (int j = 0; j < VEC; ++j) z.v[j] = from_f32<T>(0.f);
        store_pack<T, VEC>(gx + v * VEC, z);
      }
    }
    if (lane == 0) a.grad_scores[b * N + n] = gs;
  }
}

const char* check_launch() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

size_t max_dynamic_smem() {
  int device = 0, max_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // leave room for the kernel's static shared memory (histogram, scan and reduction buffers)
  return max_optin > 16 * 1024 ? static_cast<size_t>(max_optin) - 16 * 1024 : 0;
}

int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

// Channel vectors per forward block: kChannelBytes of each row, halved (down to kMinChannelBytes)
// while B rows x channel blocks would give fewer than kBlocksPerSm blocks per SM. One block per row when
// the row's keys live in global scratch (sized for one block per row).
template <typename T, int VEC>
int64_t forward_vecs_per_block(const TopkGatherForwardArgs& a) {
  constexpr int64_t kVecBytes = static_cast<int64_t>(sizeof(T)) * VEC;
  const int64_t V = a.C / VEC;
  if (a.scratch != nullptr || V <= 1) return V > 1 ? V : 1;
  int64_t per = kChannelBytes / kVecBytes > 1 ? kChannelBytes / kVecBytes : 1;
  const int64_t min_per = kMinChannelBytes / kVecBytes > 1 ? kMinChannelBytes / kVecBytes : 1;
  const int64_t want = kBlocksPerSm * sm_count();
  while (per > min_per && a.B * ((V + per - 1) / per) < want) per /= 2;
  const int64_t max_blocks = 65535;  // grid.y limit
  if ((V + per - 1) / per > max_blocks) per = (V + max_blocks - 1) / max_blocks;
  return per;
}

template <typename T, int VEC>
const char* launch_forward(const TopkGatherForwardArgs& a, cudaStream_t stream) {
  const size_t smem = a.scratch != nullptr ? 0 : static_cast<size_t>(topk_gather_row_smem_bytes(a.N));
  auto kernel = topk_gather_fwd_kernel<T, VEC>;
  if (smem > kStaticSmemLimit - 16 * 1024) {
    if (smem > max_dynamic_smem()) return "topk_gather: row too long for shared memory and no scratch given";
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const int64_t per = forward_vecs_per_block<T, VEC>(a);
  const int64_t V = a.C / VEC;
  const int64_t channel_blocks = V > per ? (V + per - 1) / per : 1;
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(channel_blocks));
  kernel<<<grid, kFwdThreads, smem, stream>>>(a, per);
  return check_launch();
}

template <typename T, int VEC>
const char* launch_backward(const TopkGatherBackwardArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>((a.N + kBwdRowsPerBlock - 1) / kBwdRowsPerBlock));
  topk_gather_bwd_kernel<T, VEC><<<grid, kBwdThreads, 0, stream>>>(a);
  return check_launch();
}

template <typename T>
bool can_vectorize(const void* x, int64_t sxb, int64_t sxn, int64_t C, const void* out) {
  constexpr int VEC = 16 / sizeof(T);
  return C % VEC == 0 && sxb % VEC == 0 && sxn % VEC == 0 && aligned16(x) && aligned16(out);
}

template <typename T>
const char* forward_typed(const TopkGatherForwardArgs& a, cudaStream_t stream) {
  if (can_vectorize<T>(a.x, a.stride_xb, a.stride_xn, a.C, a.tokens)) return launch_forward<T, 16 / sizeof(T)>(a, stream);
  return launch_forward<T, 1>(a, stream);
}

template <typename T>
const char* backward_typed(const TopkGatherBackwardArgs& a, cudaStream_t stream) {
  if (can_vectorize<T>(a.x, a.stride_xb, a.stride_xn, a.C, a.grad_x) && aligned16(a.grad_tokens)) {
    return launch_backward<T, 16 / sizeof(T)>(a, stream);
  }
  return launch_backward<T, 1>(a, stream);
}

}  // namespace

bool topk_gather_fits_on_chip(int64_t N) {
  return static_cast<size_t>(topk_gather_row_smem_bytes(N)) <= max_dynamic_smem();
}

const char* topk_gather_forward(Dtype dtype, const TopkGatherForwardArgs& a, void* stream) {
  if (a.B == 0 || a.N == 0) return nullptr;
  if (a.B > 2147483647LL) return "topk_gather: batch size exceeds the CUDA grid";
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::kFloat32: return forward_typed<float>(a, s);
    case Dtype::kFloat16: return forward_typed<__half>(a, s);
    case Dtype::kBFloat16: return forward_typed<__nv_bfloat16>(a, s);
  }
  return "topk_gather: unsupported dtype";
}

const char* topk_gather_backward(Dtype dtype, const TopkGatherBackwardArgs& a, void* stream) {
  if (a.B == 0 || a.N == 0) return nullptr;
  if (a.B > 2147483647LL) return "topk_gather_backward: batch size exceeds the CUDA grid";
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::kFloat32: return backward_typed<float>(a, s);
    case Dtype::kFloat16: return backward_typed<__half>(a, s);
    case Dtype::kBFloat16: return backward_typed<__nv_bfloat16>(a, s);
  }
  return "topk_gather_backward: unsupported dtype";
}

}  // namespace cuda
}  // namespace bus
