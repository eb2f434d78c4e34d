// Device helpers of the CUDA kernels: dtype conversion, 16-byte vector packs, warp/block reductions
// and scans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace bus {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements, aligned to their size: one 128-bit load/store when VEC * sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& in) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = in;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block, returned to every thread. `buf`: THREADS / 32 floats of shared memory.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* buf) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += buf[w];
  __syncthreads();  // buf may be reused right after
  return total;
}

// Sum of one int64 per thread over the block, returned to every thread. `buf`: THREADS / 32 long longs.
template <int THREADS>
__device__ __forceinline__ int64_t block_sum_i64(int64_t v, long long* buf) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long w = static_cast<long long>(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(kFullMask, w, o);
  if (lane == 0) buf[warp] = w;
  __syncthreads();
  long long total = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += buf[i];
  __syncthreads();  // buf may be reused right after
  return static_cast<int64_t>(total);
}

// sum_{b' < b} k[b'] (the kept tokens of the rows before row b), computed by the whole block: where row
// b's segments of the packed outputs start, with no cumsum launches on the host side.
template <int THREADS>
__device__ __forceinline__ int64_t kept_before_row(const int64_t* k, int64_t b, long long* buf) {
  int64_t part = 0;
  for (int64_t i = threadIdx.x; i < b; i += THREADS) part += k[i];
  return block_sum_i64<THREADS>(part, buf);
}

// Exclusive prefix sum of one int per thread over the block (thread order); `total` gets the sum.
// `buf`: THREADS / 32 + 1 ints of shared memory.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* buf, int& total) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int wv = lane < kWarps ? buf[lane] : 0;
    int wincl = wv;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(kFullMask, wincl, o);
      if (lane >= o) wincl += t;
    }
    if (lane < kWarps) buf[lane] = wincl - wv;
    if (lane == kWarps - 1) buf[kWarps] = wincl;
  }
  __syncthreads();
  const int result = buf[warp] + incl - v;
  total = buf[kWarps];
  __syncthreads();  // buf may be reused right after
  return result;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace bus
